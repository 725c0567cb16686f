"""Job descriptions for the CLI: model, hardware and cluster from presets or YAML/TOML files.

Three things describe a training job to the planner:

* the **model** — a :data:`~balancer.specs.MODEL_PRESETS` name (``llama-7b``) or a mapping
  of :class:`~balancer.specs.ModelSpec` fields;
* the **hardware** — a :data:`~balancer.specs.HARDWARE_PRESETS` name (``h100-80g``) or a
  mapping of :class:`~balancer.specs.HardwareSpec` fields;
* the **cluster** — a preset ``NxHW`` (``8xH100``: 8 ranks on H100-80G nodes of 8;
  ``64xA100``) or a mapping with ``num_ranks``, ``hardware`` and optional overrides.

A mapping may start from a preset and change some fields: ``{preset: llama-7b,
activation_recompute: full}``. A file (``.yaml``/``.yml``, ``.toml`` or ``.json``) holds
one spec, or several under the top-level keys ``model``, ``hardware``, ``cluster`` and
``training`` (options of the analytic cost model: ``zero_stage``, ``reserve_bytes``, …)::

    # job.yaml
    model: {preset: llama-7b, activation_recompute: selective}
    cluster: {num_ranks: 64, hardware: a100-80g}
    training: {zero_stage: 1}

Every error names the file, the key and the fix: an unknown key lists the valid keys
(and the closest match), an unknown preset lists the presets.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from balancer.specs import HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec, ModelSpec
from strategies.layout import ClusterSpec

__all__ = [
    "CONFIG_SUFFIXES",
    "ConfigError",
    "JobConfig",
    "cluster_preset_names",
    "hardware_aliases",
    "load_config_file",
    "load_job",
    "parse_cluster_preset",
    "resolve_cluster",
    "resolve_hardware",
    "resolve_model",
]

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json")
"""File types :func:`load_config_file` reads."""
SECTIONS = ("model", "hardware", "cluster", "training")
"""Top-level keys of a job file."""
_CLUSTER_KEYS = ("num_ranks", "hardware", "ranks_per_node", "memory_bytes", "speed",
                 "intra_node_bandwidth", "inter_node_bandwidth")
_TRAINING_KEYS = ("zero_stage", "vocab_parallel", "reserve_bytes", "grad_bytes", "optimizer_bytes",
                  "efficiency_decay", "min_efficiency", "tp_efficiency", "cp_efficiency")
_CLUSTER_RE = re.compile(r"^\s*(\d+)\s*[xX×*]\s*([A-Za-z][A-Za-z0-9_\-]*)\s*$")


class ConfigError(ValueError):
    """A job description that cannot be used; the message says what to change."""


# -- files ------------------------------------------------------------------------------------


def _toml_loads(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 only
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(
                "reading TOML on Python 3.10 needs the 'tomli' package: pip install tomli "
                "(or write the file as YAML)"
            ) from None
    return tomllib.loads(text)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML, TOML or JSON file into a dict (the top level must be a mapping)."""
    p = Path(path)
    if p.suffix.lower() not in CONFIG_SUFFIXES:
        raise ConfigError(f"{str(p)!r}: unknown config type {p.suffix or '(none)'!r}; use {', '.join(CONFIG_SUFFIXES)}")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data = _toml_loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        msg = " ".join(str(e).split())
        raise ConfigError(f"{str(p)!r} is not valid {suffix.lstrip('.').upper()}: {msg}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{str(p)!r}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _looks_like_file(value: str) -> bool:
    return Path(value).suffix.lower() in CONFIG_SUFFIXES or Path(value).is_file()


# -- validation helpers ---------------------------------------------------------------------------


def _check_keys(where: str, got: Mapping[str, Any], valid: tuple[str, ...] | list[str]) -> None:
    for key in got:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}valid keys: {', '.join(valid)}")


def _spec_from(kind: str, cls: type, presets: Mapping[str, Any], value: Any, where: str) -> Any:
    """A spec from a preset name or a mapping (optionally ``preset:`` plus overrides)."""
    if isinstance(value, (ModelSpec, HardwareSpec)):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key not in presets:
            raise ConfigError(f"{where}: unknown {kind} preset {value!r}; valid presets: {', '.join(sorted(presets))}")
        return presets[key]
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {kind} must be a preset name or a mapping of fields, got {type(value).__name__}")
    names = [f.name for f in fields(cls)]
    _check_keys(f"{where} ({kind})", value, ["preset", *names])
    body = dict(value)
    base: dict[str, Any] = {}
    if "preset" in body:
        base = _spec_from(kind, cls, presets, body.pop("preset"), where).to_dict()
    merged = {**base, **body}
    if cls is HardwareSpec and "name" not in merged:
        merged["name"] = "custom"
    try:
        return cls(**merged)
    except TypeError as e:  # a required field is missing
        missing = [n for n in names if n not in merged and _required(cls, n)]
        raise ConfigError(
            f"{where} ({kind}): missing {', '.join(missing) or 'fields'}; give them or start from a preset "
            f"(preset: {sorted(presets)[0]}) ({e})"
        ) from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _required(cls: type, name: str) -> bool:
    from dataclasses import MISSING

    f = next(f for f in fields(cls) if f.name == name)
    return f.default is MISSING and f.default_factory is MISSING


# -- presets ------------------------------------------------------------------------------------


def hardware_aliases() -> dict[str, str]:
    """Short hardware names accepted in a cluster preset → preset key (``h100`` → ``h100-80g``)."""
    out: dict[str, str] = {}
    for key in HARDWARE_PRESETS:
        out[key] = key
        out.setdefault(key.split("-")[0], key)
    return out


def cluster_preset_names() -> list[str]:
    """Examples of valid cluster presets, one per hardware type (``8xH100``, ...)."""
    short = sorted({k.split("-")[0] for k in HARDWARE_PRESETS})
    return [f"{HARDWARE_PRESETS[hardware_aliases()[s]].ranks_per_node}x{s.upper()}" for s in short]


def parse_cluster_preset(text: str) -> tuple[int, HardwareSpec]:
    """``"8xH100"`` → ``(8, H100-80G spec)``. Raises :class:`ConfigError` naming the fix."""
    m = _CLUSTER_RE.match(text)
    examples = ", ".join(cluster_preset_names() + ["64xA100"])
    if not m:
        raise ConfigError(
            f"cluster {text!r} is neither a preset NxHARDWARE ({examples}) nor a config file "
            f"({', '.join(CONFIG_SUFFIXES)})"
        )
    n, hw_name = int(m.group(1)), m.group(2).lower()
    aliases = hardware_aliases()
    if hw_name not in aliases:
        raise ConfigError(
            f"cluster {text!r}: unknown hardware {m.group(2)!r}; valid hardware: {', '.join(sorted(aliases))} "
            f"(e.g. {examples})"
        )
    hw = HARDWARE_PRESETS[aliases[hw_name]]
    _check_num_ranks(f"cluster {text!r}", n, hw.ranks_per_node)
    return n, hw


def _check_num_ranks(where: str, n: Any, per_node: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{where}: num_ranks={n!r} must be a positive integer (e.g. 8)")
    if n > per_node and n % per_node:
        lo, hi = n // per_node * per_node, (n // per_node + 1) * per_node
        raise ConfigError(
            f"{where}: {n} ranks are not whole nodes of {per_node}; use {lo} or {hi} "
            f"(or set ranks_per_node in a cluster file)"
        )


# -- resolution ---------------------------------------------------------------------------------


def resolve_model(value: str | Mapping[str, Any] | ModelSpec, where: str = "--model") -> ModelSpec:
    """A :class:`ModelSpec` from a preset name, a mapping or a file path (section ``model``)."""
    if isinstance(value, str) and _looks_like_file(value):
        data = load_config_file(value)
        return resolve_model(data["model"] if "model" in data else data, where=value)
    return _spec_from("model", ModelSpec, MODEL_PRESETS, value, where)


def resolve_hardware(value: str | Mapping[str, Any] | HardwareSpec, where: str = "--hardware") -> HardwareSpec:
    """A :class:`HardwareSpec` from a preset name, a mapping or a file path (section ``hardware``)."""
    if isinstance(value, str) and _looks_like_file(value):
        data = load_config_file(value)
        return resolve_hardware(data["hardware"] if "hardware" in data else data, where=value)
    return _spec_from("hardware", HardwareSpec, HARDWARE_PRESETS, value, where)


def resolve_cluster(
    value: str | Mapping[str, Any], where: str = "--cluster", hardware: HardwareSpec | None = None
) -> tuple[ClusterSpec, HardwareSpec]:
    """A :class:`ClusterSpec` and its :class:`HardwareSpec` from a preset (``8xH100``), a mapping
    or a file path (section ``cluster``). ``hardware`` replaces the cluster's own hardware.

    The cluster takes memory, bandwidths and ranks per node from the hardware unless the
    mapping overrides them (overridden memory also applies to the hardware spec, so the
    cost model's memory model sees the same number).
    """
    if isinstance(value, str):
        if _looks_like_file(value):
            data = load_config_file(value)
            body = data["cluster"] if "cluster" in data else data
            if "cluster" in data and "hardware" in data and hardware is None and isinstance(body, Mapping):
                body = {"hardware": data["hardware"], **body}
            return resolve_cluster(body, where=value, hardware=hardware)
        n, hw = parse_cluster_preset(value)
        hw = hardware or hw
        return _cluster(n, hw, {}), hw
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: cluster must be a preset like 8xH100 or a mapping, got {type(value).__name__}")
    _check_keys(f"{where} (cluster)", value, _CLUSTER_KEYS)
    if "num_ranks" not in value:
        raise ConfigError(f"{where} (cluster): missing num_ranks (the number of devices, e.g. num_ranks: 64)")
    if hardware is None:
        if "hardware" not in value:
            raise ConfigError(
                f"{where} (cluster): missing hardware; name a preset ({', '.join(sorted(HARDWARE_PRESETS))}) "
                "or give a mapping of HardwareSpec fields"
            )
        hardware = _spec_from("hardware", HardwareSpec, HARDWARE_PRESETS, value["hardware"], where)
    over = {k: v for k, v in value.items() if k not in ("num_ranks", "hardware")}
    per_node = over.get("ranks_per_node", hardware.ranks_per_node)
    _check_num_ranks(f"{where} (cluster)", value["num_ranks"], per_node if isinstance(per_node, int) else 1)
    try:
        if "memory_bytes" in over or "ranks_per_node" in over:
            hardware = hardware.replace(
                **{k: over[k] for k in ("memory_bytes", "ranks_per_node") if k in over}
            )
        return _cluster(int(value["num_ranks"]), hardware, over), hardware
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _cluster(num_ranks: int, hw: HardwareSpec, over: Mapping[str, Any]) -> ClusterSpec:
    kw: dict[str, Any] = {
        "num_ranks": num_ranks,
        "ranks_per_node": hw.ranks_per_node,
        "memory_bytes": hw.memory_bytes,
        "intra_node_bandwidth": hw.intra_node_bandwidth,
        "inter_node_bandwidth": hw.inter_node_bandwidth,
    }
    kw.update(over)
    if "speed" in kw:
        kw["speed"] = tuple(kw["speed"] or ())
    return ClusterSpec(**kw)


# -- the whole job --------------------------------------------------------------------------------


@dataclass(kw_only=True)
class JobConfig:
    """What the planner knows about a job; any part may be missing (``None``)."""

    model: ModelSpec | None = None
    hardware: HardwareSpec | None = None
    cluster: ClusterSpec | None = None
    training: dict[str, Any] = field(default_factory=dict)
    """Options of the analytic cost model (:class:`~balancer.analytic_options.AnalyticOptions` fields)."""

    def __post_init__(self) -> None:
        _check_keys("training", self.training, _TRAINING_KEYS)

    def cost_model(self) -> Any:
        """The analytic :class:`~balancer.cost.CostModel` of this model on this hardware."""
        from balancer.cost import CostModel

        if self.model is None:
            raise ConfigError("no model given; pass --model (a preset or a file) or --cost-model FILE")
        hw = self.hardware
        if hw is None:
            raise ConfigError("no hardware given; pass --cluster (e.g. 8xH100) or --hardware")
        opts = dict(self.training)
        if self.cluster is not None:
            opts.setdefault("num_ranks", self.cluster.num_ranks)
        try:
            return CostModel.analytic(self.model, hw, **opts)
        except ValueError as e:
            raise ConfigError(f"training options: {e}") from None


def load_job(
    *,
    model: str | None = None,
    cluster: str | None = None,
    hardware: str | None = None,
    config: str | None = None,
) -> JobConfig:
    """Combine ``--config FILE`` with ``--model``, ``--cluster`` and ``--hardware`` (flags win)."""
    data: dict[str, Any] = {}
    if config is not None:
        data = load_config_file(config)
        _check_keys(config, data, SECTIONS)
    hw = resolve_hardware(hardware) if hardware is not None else None
    if hw is None and "hardware" in data:
        hw = resolve_hardware(data["hardware"], where=f"{config} (hardware)")
    spec = resolve_model(model) if model is not None else None
    if spec is None and "model" in data:
        spec = resolve_model(data["model"], where=str(config))
    clus = None
    if cluster is not None:
        clus, hw_c = resolve_cluster(cluster, hardware=hw)
        hw = hw_c
    elif "cluster" in data:
        clus, hw_c = resolve_cluster(data["cluster"], where=str(config), hardware=hw)
        hw = hw_c
    training = data.get("training") or {}
    if not isinstance(training, Mapping):
        raise ConfigError(f"{config} (training): must be a mapping of cost-model options ({', '.join(_TRAINING_KEYS)})")
    _check_keys(f"{config} (training)", training, _TRAINING_KEYS)
    return JobConfig(model=spec, hardware=hw, cluster=clus, training=dict(training))
