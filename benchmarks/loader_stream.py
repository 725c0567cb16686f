"""Streaming loader benchmark: ``stream_split="per_rank"`` against ``"replicated"`` on real gloo ranks.

    python benchmarks/loader_stream.py --lengths PATH_OR_BUNDLED_NAME [--num-samples N] [--world-size 2,4]
                                       [--tokens-per-step T] [--max-length L] [--step-ms MS]
                                       [--formats list,int64] [--streams torch,hf] [--repeats R]

One stream for every mode: the given lengths (the first ``--num-samples`` rows, capped at
``--max-length``) with synthetic token ids ``(offset_i + arange(n)) % 32000`` made as the
stream is read, as Python lists of ints (``list``) or int64 NumPy arrays (``int64``).
Each world size runs on ``W`` real gloo processes (:func:`strategies.runtime.local.run_local`,
one thread each); every rank runs a :class:`~dataloader.loader.BalancedDataLoader` with a
:class:`~balancer.selector.Balancer` (analytic ``llama-7b`` on ``a100-80g``, as
``benchmarks/loader.py``) over:

* **torch, replicated**: a torch ``IterableDataset`` yielding the whole stream on every rank;
* **torch, per_rank**: the same class yielding the rank's slice (samples ``i`` with ``i % W == r``);
* **hf, replicated** / **hf, per_rank**: the stream as a Hugging Face ``datasets`` arrow file read
  with ``to_iterable_dataset`` — whole on every rank, or ``split_dataset_by_node`` per rank
  (``with_format("numpy")`` for ``int64``).

Every (stream, format, mode) runs one epoch with no training step (as fast as the loader
delivers) and one with a simulated training step of ``--step-ms`` ms (``time.sleep``: a GPU
step, the host idle), ``--repeats`` times interleaved; medians per rank. Reported per rank:

* **tokens/s**: tokens of the rank's micro-batches (its replica's planned tokens) per second,
  after the first step (start-up is not throughput);
* **samples read**: samples this rank's stream yielded (``loader.stats.num_samples``);
* **bytes received** per step and per token (``loader.stats.received_sample_bytes``): per token
  of the rank's micro-batches, and per token of the samples it received (its micro-batches'
  samples that another rank read: the pickled size of a token);
* **CPU ms/step**: process CPU time (``time.process_time``, every thread) over the epoch per
  step; of it, the loader's own counters (:class:`~dataloader.config.SamplerStats`, the
  epoch's difference per step): reading the stream (``read_seconds``: thread CPU of the
  dataset's ``next``); **exchange** (``exchange_seconds``): the thread CPU of the per-rank
  sample exchange (pickling what goes out, the ``all_to_all_single`` call and unpickling);
  **collectives** (``collective_seconds``): the wall time of every collective of the
  loader's planning thread (G1/G2/G3, the plan broadcast, the all-to-all; waiting for peers
  included); **plan** (``plan_seconds``): ``StepPlan.plan_seconds`` (the planner, rank 0
  under ``broadcast``).

Ratios are per_rank / replicated of the same stream and format, measured in the same run.

Results: ``benchmarks/results/loader_stream.json`` and ``.md``, with the command, date and
machine load (``os.getloadavg``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "benchmarks")]

import torch.utils.data as tud

from balancer.data import bundled_path, read_lengths
from dataloader import BalancedDataLoader
from strategies.runtime.local import run_local


def _loader_bench() -> Any:
    """benchmarks/loader.py (the family's balancer and machine record), loaded from its file."""
    spec = importlib.util.spec_from_file_location("loader_bench", ROOT / "benchmarks" / "loader.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = mod  # type: ignore[union-attr]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


loader_bench = _loader_bench()
VOCAB = loader_bench.VOCAB
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("replicated", "per_rank")
STEP_KINDS = ("none", "sleep")


# ---------------------------------------------------------------------------------------
# the stream
# ---------------------------------------------------------------------------------------
def token_ids(offset: int, n: int) -> np.ndarray:
    return np.arange(offset, offset + n, dtype=np.int64) % VOCAB


class SyntheticStream(tud.IterableDataset):  # type: ignore[type-arg]
    """Samples ``i = start, start + step, ...`` of the stream, token ids made as they are read."""

    def __init__(self, lengths: np.ndarray, fmt: str, start: int = 0, step: int = 1) -> None:
        self.lengths, self.fmt, self.start, self.step = lengths, fmt, start, step
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.start, self.lengths.size, self.step):
            ids = token_ids(int(self.offsets[i]), int(self.lengths[i]))
            yield {"input_ids": ids.tolist() if self.fmt == "list" else ids}


def write_arrow(lengths: np.ndarray, folder: Path) -> None:
    """The stream as a Hugging Face dataset on disk (one ``input_ids`` column of int64 lists)."""
    import datasets
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.arange(int(offsets[-1]), dtype=np.int64) % VOCAB  # sample i starts at offset_i: token_ids()
    table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))})
    datasets.Dataset(table).save_to_disk(str(folder))


def hf_stream(folder: str, fmt: str, mode: str, rank: int, world: int) -> Any:
    import datasets
    from datasets.distributed import split_dataset_by_node

    ds = datasets.load_from_disk(folder).to_iterable_dataset(num_shards=4 * world)
    if mode == "per_rank":
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    return ds.with_format("numpy") if fmt == "int64" else ds


# ---------------------------------------------------------------------------------------
# one rank
# ---------------------------------------------------------------------------------------
def run_epoch(loader: BalancedDataLoader, rank: int, world: int, step_s: float) -> dict[str, Any]:
    """One epoch; per step the rank's planned tokens, received tokens and replica; timing after the first step.

    Where the loader's time went comes from its own counters (``loader.stats``: read, exchange,
    collective and plan seconds), taken as the epoch's difference.
    """
    steps: list[tuple[int, int, int, int]] = []  # (step, replica, planned tokens, received tokens)
    before = dataclasses.replace(loader.stats)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for b in loader:
        if not steps:
            t0 = time.perf_counter()  # the first step is start-up: tokens/s counts the steps after it
        planned = sum(e - s for spec in b.specs for s, e in zip(spec.starts, spec.ends))
        received = {sid: n for spec in b.specs for sid, n in zip(spec.sample_ids, spec.full_lengths) if sid % world != rank}
        steps.append((b.step, b.rank_plan.replica_index, planned, sum(received.values())))
        if step_s:
            time.sleep(step_s)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    n = len(steps)
    stats = loader.stats

    def ms_per_step(name: str) -> float:
        return 1e3 * (getattr(stats, name) - getattr(before, name)) / n

    steady = sum(s[2] for s in steps[1:])
    return {
        "steps": steps,
        "tokens": sum(s[2] for s in steps),
        "received_tokens": sum(s[3] for s in steps),
        "seconds": seconds,
        "tokens_per_second": steady / seconds if seconds > 0 else 0.0,
        "samples_read": loader.stats.num_samples,
        "received_bytes": loader.stats.received_sample_bytes,
        "cpu_ms_per_step": 1e3 * cpu / n,
        "read_cpu_ms_per_step": ms_per_step("read_seconds"),
        "exchange_cpu_ms_per_step": ms_per_step("exchange_seconds"),
        "collectives_wall_ms_per_step": ms_per_step("collective_seconds"),
        "plan_ms_per_step": ms_per_step("plan_seconds"),
    }


def fresh(template: Any) -> Any:
    """A new Balancer on the template's candidates (its record of the previous strategy is state)."""
    return type(template)(template.cluster_spec, template.candidates, template.cost_model, template.config)


def rank_main(rank: int, world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every configuration on this rank, in the same order on every rank (the loaders' collectives pair up)."""
    lengths = np.asarray(cfg["lengths"], dtype=np.int64)
    template = loader_bench.build_balancer(lengths, world, cfg["tokens_per_step"], cfg["max_length"])
    out = []
    for repeat in range(-1, cfg["repeats"]):  # repeat -1 warms up (the JIT, the first collectives) and is dropped  # interleaved, so that drift of the machine hits every configuration alike
        for fmt in cfg["formats"]:
            for stream in cfg["streams"]:
                for mode in MODES:
                    for kind in STEP_KINDS if repeat >= 0 else ("none",):
                        if stream == "torch":
                            ds = SyntheticStream(lengths, fmt, *((rank, world) if mode == "per_rank" else (0, 1)))
                        else:
                            ds = hf_stream(cfg["arrow"], fmt, mode, rank, world)
                        loader = BalancedDataLoader(
                            ds, balancer=fresh(template), tokens_per_step=cfg["tokens_per_step"],
                            max_length=cfg["max_length"], stream_split=mode, plan_ahead=cfg["plan_ahead"],
                        )
                        rec = run_epoch(loader, rank, world, cfg["step_ms"] / 1e3 if kind == "sleep" else 0.0)
                        loader.close()
                        if repeat >= 0:
                            out.append({"repeat": repeat, "format": fmt, "stream": stream, "mode": mode, "step": kind, **rec})
    return out


# ---------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------
TIMED = ("tokens_per_second", "cpu_ms_per_step", "read_cpu_ms_per_step", "exchange_cpu_ms_per_step",
         "collectives_wall_ms_per_step", "plan_ms_per_step")


def summarise(per_rank: list[list[dict[str, Any]]], stream_tokens: int, num_samples: int) -> list[dict[str, Any]]:
    """One row per (format, stream, mode, step kind): per-rank medians over repeats, then mean (and min/max) over ranks."""
    world = len(per_rank)
    keys = sorted({(r["format"], r["stream"], r["mode"], r["step"]) for r in per_rank[0]}, key=_order)
    rows = []
    for key in keys:
        ranks = []
        for recs in per_rank:
            mine = [r for r in recs if (r["format"], r["stream"], r["mode"], r["step"]) == key]
            first = mine[0]
            if any(r["steps"] != first["steps"] or r["received_bytes"] != first["received_bytes"] for r in mine):
                raise RuntimeError(f"{key}: the repeats delivered different steps or bytes; the stream must be deterministic")
            ranks.append({k: first[k] for k in ("tokens", "received_tokens", "samples_read", "received_bytes")}
                         | {"steps": len(first["steps"]), "runs": mine})
        replicas: dict[tuple[int, int], int] = {}
        for rank in ranks:
            for step, replica, planned, _ in rank["runs"][0]["steps"]:
                if replicas.setdefault((step, replica), planned) != planned:
                    raise RuntimeError(f"{key}: step {step}: peers of replica {replica} hold different tokens")
        first_step = min(step for step, _ in replicas)
        steady = sum(n for (step, _), n in replicas.items() if step != first_step)
        for rank in ranks:  # per-rank medians over the repeats
            runs = rank.pop("runs")
            rank.update({k: statistics.median(r[k] for r in runs) for k in TIMED})
            rank["stream_tokens_per_second"] = statistics.median(steady / r["seconds"] for r in runs)
        steps = ranks[0]["steps"]
        fmt, stream, mode, kind = key
        row = {
            "format": fmt, "stream": stream, "mode": mode, "step": kind, "steps": steps,
            "stream_tokens": stream_tokens, "num_samples": num_samples,
            "replica_tokens": sum(replicas.values()),
            "per_rank": ranks,
        }
        for k in (*TIMED, "stream_tokens_per_second"):
            row[k] = float(np.mean([r[k] for r in ranks]))
        row["stream_tokens_per_step"] = row["replica_tokens"] / steps
        row["tokens_per_second_min"] = min(r["tokens_per_second"] for r in ranks)
        row["tokens"] = sum(r["tokens"] for r in ranks)
        row["samples_read_per_rank"] = float(np.mean([r["samples_read"] for r in ranks]))
        row["samples_read"] = sum(r["samples_read"] for r in ranks)
        row["received_bytes"] = sum(r["received_bytes"] for r in ranks)
        row["received_tokens"] = sum(r["received_tokens"] for r in ranks)
        row["received_bytes_per_rank_per_step"] = row["received_bytes"] / world / steps
        row["received_bytes_per_token"] = row["received_bytes"] / row["tokens"]
        row["received_bytes_per_received_token"] = row["received_bytes"] / row["received_tokens"] if row["received_tokens"] else 0.0
        rows.append(row)
    return rows


def _order(key: tuple[str, str, str, str]) -> tuple[int, ...]:
    fmt, stream, mode, kind = key
    return (("list", "int64").index(fmt), ("torch", "hf").index(stream), MODES.index(mode), STEP_KINDS.index(kind))


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """per_rank / replicated of the same format, stream and step kind."""
    by = {(r["format"], r["stream"], r["mode"], r["step"]): r for r in rows}
    out = []
    for (fmt, stream, mode, kind), pr in by.items():
        rep = by.get((fmt, stream, "replicated", kind))
        if mode != "per_rank" or rep is None:
            continue
        out.append({
            "format": fmt, "stream": stream, "step": kind,
            "tokens_per_second": pr["tokens_per_second"] / rep["tokens_per_second"],
            "stream_tokens_per_second": pr["stream_tokens_per_second"] / rep["stream_tokens_per_second"],
            "cpu_per_step": pr["cpu_ms_per_step"] / rep["cpu_ms_per_step"],
            "samples_read_per_rank": pr["samples_read_per_rank"] / rep["samples_read_per_rank"],
        })
    return out


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def _csv(text: str, allowed: tuple[str, ...], flag: str, ap: argparse.ArgumentParser) -> list[str]:
    items = [x for x in text.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if not items or bad:
        ap.error(f"{flag}={text!r}: choose from {', '.join(allowed)} (comma-separated)")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="pretrain_wikipedia_flexsp_100k", help="Parquet length file or bundled name")
    ap.add_argument("--num-samples", type=int, default=2_000)
    ap.add_argument("--world-size", default="2,4", help="gloo ranks, comma-separated (each size is one run)")
    ap.add_argument("--tokens-per-step", type=int, default=65_536)
    ap.add_argument("--max-length", type=int, default=8_192)
    ap.add_argument("--plan-ahead", type=int, default=2)
    ap.add_argument("--step-ms", type=float, default=50.0, help="simulated training step (sleep), milliseconds")
    ap.add_argument("--formats", default="list,int64", help="token ids as: list (Python ints), int64 (NumPy arrays)")
    ap.add_argument("--streams", default="torch,hf", help="torch (IterableDataset), hf (datasets, split_dataset_by_node)")
    ap.add_argument("--repeats", type=int, default=3, help="epochs per configuration (median per rank)")
    ap.add_argument("--timeout-s", type=float, default=1_800.0, help="bound on each world size's run, seconds")
    ap.add_argument("--out", default=str(RESULTS / "loader_stream.json"))
    args = ap.parse_args(argv)
    worlds = [int(w) for w in args.world_size.split(",") if w]
    if not worlds or min(worlds) < 2:
        ap.error(f"--world-size={args.world_size!r}: give rank counts >= 2, e.g. 2,4")
    if args.repeats < 1 or args.step_ms <= 0 or args.num_samples < 1:
        ap.error(f"--repeats={args.repeats}, --num-samples={args.num_samples} must be >= 1 and --step-ms={args.step_ms} > 0")
    formats = _csv(args.formats, ("list", "int64"), "--formats", ap)
    streams = _csv(args.streams, ("torch", "hf"), "--streams", ap)

    path = Path(args.lengths)
    lengths = read_lengths(path if path.suffix else bundled_path(args.lengths))[: args.num_samples]
    lengths = np.minimum(lengths, args.max_length).astype(np.int64)
    cfg = {
        "lengths": lengths.tolist(), "tokens_per_step": args.tokens_per_step, "max_length": args.max_length,
        "plan_ahead": args.plan_ahead, "step_ms": args.step_ms, "formats": formats, "streams": streams,
        "repeats": args.repeats,
    }
    runs = []
    with tempfile.TemporaryDirectory(prefix="hydraulis-stream-bench-") as tmp:
        if "hf" in streams:
            write_arrow(lengths, Path(tmp) / "stream")
        cfg["arrow"] = str(Path(tmp) / "stream")
        for world in worlds:
            t0 = time.perf_counter()
            per_rank = run_local(rank_main, world, (cfg,), timeout_s=args.timeout_s, collective_timeout_s=300.0)
            rows = summarise(per_rank, int(lengths.sum()), int(lengths.size))
            runs.append({"world_size": world, "seconds": time.perf_counter() - t0, "rows": rows, "ratios": ratios(rows)})
    argv_used = sys.argv[1:] if argv is None else argv
    result = {
        "benchmark": "loader_stream",
        "lengths": str(args.lengths),
        "num_samples": int(lengths.size),
        "stream_tokens": int(lengths.sum()),
        "tokens_per_step": args.tokens_per_step,
        "max_length": args.max_length,
        "plan_ahead": args.plan_ahead,
        "step_ms": args.step_ms,
        "repeats": args.repeats,
        "runs": runs,
        "command": " ".join(["python benchmarks/loader_stream.py", *argv_used]),
        "machine": loader_bench.machine(),
    }
    table = markdown(result)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    return 0


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        (f"Streaming loader benchmark: {r['lengths']} ({r['num_samples']:,} samples, {r['stream_tokens']:,} tokens, "
        f"capped at {r['max_length']:,}), {r['tokens_per_step']:,} tokens/step, plan_ahead={r['plan_ahead']}, "
        f"simulated step {r['step_ms']:.0f} ms (sleep), {r['repeats']} interleaved epochs per configuration (medians "
        f"per rank, then the mean over ranks); gloo ranks with one thread each; load {m['load_avg_1_5_15']} on "
        f"{m['cpus']} CPUs, {m['time']}. Command: `{r['command']}`"),
    ]
    for run in r["runs"]:
        w = run["world_size"]
        lines += [
            "",
            f"**{w} ranks** ({run['seconds']:.0f} s)",
            "",
            ("| format | stream | mode | step | steps (stream tokens/step) | tokens/s per rank (min) | stream tokens/s | "
            "samples read per rank | "
            "bytes received per rank per step | bytes/token (of the rank's tokens / of received tokens) | "
            "CPU ms/step (read / exchange) | collectives wall ms/step | plan ms/step |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for x in run["rows"]:
            lines.append(
                f"| {x['format']} | {x['stream']} | {x['mode']} | {x['step']} | {x['steps']} ({x['stream_tokens_per_step']:,.0f}) | "
                f"{x['tokens_per_second']:,.0f} ({x['tokens_per_second_min']:,.0f}) | {x['stream_tokens_per_second']:,.0f} | "
                f"{x['samples_read_per_rank']:,.0f} | "
                f"{x['received_bytes_per_rank_per_step']:,.0f} | {x['received_bytes_per_token']:.2f} / "
                f"{x['received_bytes_per_received_token']:.2f} | {x['cpu_ms_per_step']:.1f} ({x['read_cpu_ms_per_step']:.1f} / "
                f"{x['exchange_cpu_ms_per_step']:.1f}) | {x['collectives_wall_ms_per_step']:.1f} | {x['plan_ms_per_step']:.1f} |"
            )
        lines += [
            "",
            f"per_rank / replicated, {w} ranks: "
            + "; ".join(
                f"{q['format']} {q['stream']} {'no step' if q['step'] == 'none' else 'sleep step'}: tokens/s per rank "
                f"{q['tokens_per_second']:.2f}×, stream tokens/s {q['stream_tokens_per_second']:.2f}×, CPU/step {q['cpu_per_step']:.2f}×, samples read {q['samples_read_per_rank']:.2f}×"
                for q in run["ratios"]
            ),
        ]
    lines += [
        "",
        ("tokens/s per rank: tokens of the rank's micro-batches (its replica's, as planned: tensor-parallel peers "
        "count the same tokens) per second after the first step; stream tokens/s: the tokens of every replica, each "
        "once, per second (the stream's training rate). The two modes form different global batches (per_rank fills "
        "the budget per rank, so its steps hold fewer tokens) and may plan other layouts, so compare stream tokens/s. "
        "Bytes received: `loader.stats.received_sample_bytes` (pickled samples of the all-to-all; replicated moves "
        "none), per token of the rank's micro-batches and per token of the samples it received. CPU: process CPU "
        "time per step (every thread); read: `loader.stats.read_seconds`, thread CPU of the stream's `next`; "
        "exchange: `loader.stats.exchange_seconds`, thread CPU of pickling, the all-to-all and unpickling "
        "(per_rank). Collectives: `loader.stats.collective_seconds`, wall time of every collective of the planning "
        "thread, waiting for peers included. Plan: `loader.stats.plan_seconds`, the sum of `StepPlan.plan_seconds`."),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
