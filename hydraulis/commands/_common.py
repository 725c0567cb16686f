"""Helpers shared by the subcommands: arguments, inputs, cost models and tables."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np

    from balancer.cost import CostModel
    from balancer.profile import LengthProfile
    from hydraulis.config import JobConfig
    from strategies.layout import ClusterSpec

DEFAULT_TOKENS_PER_STEP = 1 << 20
"""Tokens per global batch unless given: 1,048,576 (128K per GPU on 8 GPUs)."""


class CliError(ValueError):
    """A user error: printed as ``hydraulis: error: <message>``, exit code 1."""


# -- arguments -----------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with ``_`` or ``,`` separators and K/M suffixes (``1M``)."""
    s = text.strip().replace("_", "").replace(",", "")
    scale = 1
    if s[-1:].lower() in ("k", "m"):
        scale = 1024 if s[-1].lower() == "k" else 1 << 20
        s = s[:-1]
    try:
        value = int(s) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 1048576, 1M or 64K)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def add_job_arguments(p: argparse.ArgumentParser, *, cluster_required: bool = True) -> None:
    """``--cluster``, ``--model`` / ``--cost-model``, ``--hardware``, ``--config``."""
    g = p.add_argument_group("job (presets or YAML/TOML files; see docs/cli.md)")
    g.add_argument("--cluster", metavar="C",
                   help="NxHARDWARE preset (8xH100, 64xA100, 16xH200) or a cluster file"
                   + ("" if cluster_required else " (optional)"))
    g.add_argument("--model", metavar="M", help="model preset (tiny, llama-7b, llama-13b, llama-70b) or a model file")
    g.add_argument("--cost-model", metavar="FILE",
                   help="cost-model JSON (from `hydraulis calibrate` or CostModel.save) instead of --model")
    g.add_argument("--hardware", metavar="H",
                   help="hardware preset (h100-80g, a100-80g, h200, cpu) or file; default: the cluster's")
    g.add_argument("--config", metavar="FILE",
                   help="one YAML/TOML/JSON file with sections model, hardware, cluster, training")


def add_lengths_arguments(p: argparse.ArgumentParser) -> None:
    """``--profile P`` or ``--lengths L`` (one of them is required)."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--profile", metavar="P", help="profile JSON written by `hydraulis profile`")
    g.add_argument("--lengths", metavar="L",
                   help="a length file (Parquet with a 'length' column) or a bundled name such as code_kafka")


# -- inputs ----------------------------------------------------------------------------------------


@dataclass
class LengthInput:
    """Lengths for planning: a profile always, the raw lengths when a length file was given."""

    profile: "LengthProfile"
    lengths: "np.ndarray | None"
    label: str

    def sample(self, n: int, seed: int) -> "np.ndarray":
        """Raw lengths when known, else ``n`` lengths drawn from the profile."""
        return self.lengths if self.lengths is not None else self.profile.sample(n, seed=seed)


def load_lengths(args: argparse.Namespace) -> LengthInput:
    from balancer.profile import LengthProfile

    if getattr(args, "profile", None):
        prof = LengthProfile.load(args.profile)
        return LengthInput(profile=prof, lengths=None, label=prof.source or str(args.profile))
    lengths = read_length_file(args.lengths)
    return LengthInput(profile=LengthProfile.from_lengths(lengths, source=args.lengths), lengths=lengths,
                       label=str(args.lengths))


def read_length_file(value: str) -> "np.ndarray":
    """A bundled name (``code_kafka``) or a Parquet length file, else any dataset file via
    :mod:`dataloader.sources` (auto-detected column)."""
    from balancer.data import bundled_names, read_lengths
    from dataloader.sources import DATA_SUFFIXES, read_dataset_lengths

    p = Path(value)
    if not p.exists() and not p.suffix:
        if value not in bundled_names():
            raise CliError(f"no file {value!r} and no bundled length file of that name; bundled: {', '.join(bundled_names())}")
        return read_lengths(value)
    if p.suffix == ".parquet" and p.is_file():
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(p).names
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for a bad file
            raise CliError(f"cannot read {value!r} as Parquet: {' '.join(str(e).split())}") from None
        if "length" in names:
            return read_lengths(p)
    if p.suffix.lower() in DATA_SUFFIXES or p.is_dir() or not p.exists():
        hint = "count its tokens once with `hydraulis profile DATA --tokenizer tokenizer.json` and pass --profile"
        return read_dataset_lengths(p, progress=False, text_hint=hint).lengths
    raise CliError(f"{value!r} is not a length file; give a Parquet file with a 'length' column or a bundled name")


def load_job(args: argparse.Namespace) -> "JobConfig":
    from hydraulis.config import load_job as _load

    return _load(model=getattr(args, "model", None), cluster=getattr(args, "cluster", None),
                 hardware=getattr(args, "hardware", None), config=getattr(args, "config", None))


def load_cost_and_cluster(args: argparse.Namespace, *, need_cluster: bool = True) -> tuple["CostModel", "ClusterSpec | None", "JobConfig", str]:
    """The cost model (``--cost-model`` or analytic from the job) and the cluster.

    Returns ``(cost_model, cluster, job, label)``; ``label`` describes the cost model.
    """
    from balancer.cost import CostModel

    if getattr(args, "cost_model", None) and getattr(args, "model", None):
        raise CliError("give either --model (analytic cost model) or --cost-model FILE, not both")
    job = load_job(args)
    if need_cluster and job.cluster is None:
        raise CliError("no cluster given; pass --cluster (e.g. 8xH100, 64xA100) or a config file with a cluster section")
    if getattr(args, "cost_model", None):
        cost = CostModel.load(args.cost_model)
        label = f"{cost.source} cost model from {args.cost_model}"
    else:
        if job.model is None:
            raise CliError("no model given; pass --model (e.g. llama-7b) or --cost-model FILE")
        cost = job.cost_model()
        assert job.hardware is not None
        label = f"analytic: {job.model.name} on {job.hardware.name}"
    return cost, job.cluster, job, label


def describe_cluster(cluster: "ClusterSpec", hardware_name: str | None) -> str:
    nodes = cluster.num_ranks // cluster.ranks_per_node if cluster.num_ranks >= cluster.ranks_per_node else 1
    per = min(cluster.num_ranks, cluster.ranks_per_node)
    hw = f" × {hardware_name}" if hardware_name else ""
    return f"{cluster.num_ranks} ranks ({nodes} node{'s' if nodes != 1 else ''} of {per}{hw})"


def layout_capacities(cluster: "ClusterSpec", cost: "CostModel", *, allow_pp: bool, max_cp: int | None) -> list[tuple[Any, int]]:
    """``[(layout, token capacity)]`` of every layout the cost model prices on this cluster."""
    from balancer.candidates import enumerate_layouts

    lays = enumerate_layouts(cluster, cost, allow_pp=allow_pp, max_cp=max_cp)
    return [(lay, int(cost.token_capacity(lay))) for lay in lays]


def choose_max_length(requested: int | None, longest: int, capacities: Sequence[tuple[Any, int]]) -> tuple[int, str]:
    """The longest sequence to plan for, and a note for the user.

    Default: the data's longest sequence, capped at the largest layout capacity.
    """
    if not capacities:
        raise CliError("the cost model prices no layout on this cluster (nothing fits memory); use more ranks, "
                       "more memory per device, a smaller model, or shard the optimizer states with a config file "
                       "section training: {zero_stage: 1} (see docs/cli.md)")
    largest = max(c for _, c in capacities)
    if requested is not None:
        if requested > largest:
            raise CliError(
                f"--max-length {requested:,} is above the largest token capacity {largest:,} of any layout on this "
                f"cluster; use --max-length {largest} or fewer"
            )
        note = "" if requested >= longest else f"; {longest:,}-token sequences are cut to it by the loader's overlong policy"
        return requested, f"{requested:,} tokens (--max-length{note})"
    if longest <= largest:
        return longest, f"{longest:,} tokens (the longest sequence)"
    return largest, (
        f"{largest:,} tokens (the largest layout capacity; the data has sequences up to {longest:,}, which the "
        "loader must truncate or split: overlong='truncate'/'split')"
    )


def output_dir(path: str | Path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {str(out)!r} exists and is not a folder; choose another path")
    out.mkdir(parents=True, exist_ok=True)
    return out


# -- printing --------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table padded to aligned columns (``align``: one ``l``/``r`` per column)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    al = align or "l" + "r" * (len(headers) - 1)

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, al)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, al)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def fmt_seconds(x: float | None, unit: str = "s") -> str:
    if x is None:
        return "—"
    if unit == "ms":
        return f"{x:,.1f} ms"
    if x >= 100:
        return f"{x:,.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1e3:.1f} ms"


def fmt_params(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    return f"{n:,}"
