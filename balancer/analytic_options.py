"""Options of the analytic cost model: the training choices it needs beyond the model and
hardware shapes (ZeRO stage, rank count, vocabulary split, memory reserve, bytes per
gradient and optimizer state) and the efficiency tables of tensor and context parallelism.

:class:`AnalyticOptions` is validated on construction; :class:`balancer.analytic.AnalyticModel`
prices layouts with it (formulas in ``docs/cost_model.md``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

__all__ = ["CP_EFFICIENCY_DEFAULT", "TP_EFFICIENCY_HYDRAULIS_13B", "ZERO_STAGES", "AnalyticOptions"]

ZERO_STAGES: tuple[int | str, ...] = (0, 1, 2, 3, "world")
"""Values of :attr:`AnalyticOptions.zero_stage`."""

TP_EFFICIENCY_HYDRAULIS_13B: tuple[float, ...] = (1.0, 0.90, 0.84, 0.66)
"""Matmul efficiency at tp = 1, 2, 4, 8, fitted so that ``llama-13b`` on ``a100-80g`` (with
the all-reduce times of :mod:`balancer.analytic`) reproduces the per-GPU linear cost ``b·tp·pp`` of the
Hydraulis authors' published 13B profile: ×1.154 (tp2pp2), ×1.278 (tp4), ×1.708 (tp8)
against tp1 (``balancer/data/instances_hydraulis_13b_64gpu.json``; ``docs/cost_model.md``)."""
CP_EFFICIENCY_DEFAULT: tuple[float, ...] = (1.0, 0.95, 0.90, 0.85)
"""Efficiency at cp = 1, 2, 4, 8: 5 % per doubling (cp keeps matmul widths; no published
per-degree profile to fit)."""


def _efficiency_table(name: str, values: Any) -> tuple[float, ...]:
    """Validate a per-doubling efficiency table and return it as a tuple of floats."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"AnalyticOptions: {name}={values!r} must be a sequence of factors at degree 1, 2, 4, … (e.g. (1.0, 0.9, 0.84))")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"AnalyticOptions: {name}={values!r} must hold numbers in (0, 1]") from None
    if not out or out[0] != 1.0:
        raise ValueError(f"AnalyticOptions: {name}={values!r} must start with 1.0 (degree 1 is the reference; mfu covers it)")
    for k, v in enumerate(out):
        if not (math.isfinite(v) and 0 < v <= 1):
            raise ValueError(f"AnalyticOptions: {name}[{k}]={v!r} (degree {2**k}) must be in (0, 1]")
        if k and v > out[k - 1]:
            raise ValueError(
                f"AnalyticOptions: {name}[{k}]={v!r} (degree {2**k}) exceeds {out[k - 1]!r} at degree {2 ** (k - 1)}; "
                "efficiency must not rise with the degree"
            )
    return out


def _table_factor(table: tuple[float, ...], degree: int) -> float:
    """Factor of ``degree`` from a per-doubling table: exact at powers of two, linear in
    ``log2(degree)`` between entries, and past the last entry the last doubling's ratio
    repeats (``table[-1]·(table[-1]/table[-2])^(x − last)``, ``x = log2(degree)``)."""
    last = len(table) - 1
    if last == 0:
        return table[0]
    x = math.log2(degree)
    if x >= last:
        return table[-1] * (table[-1] / table[-2]) ** (x - last)
    k = int(x)
    return table[k] + (table[k + 1] - table[k]) * (x - k)


@dataclass(frozen=True, kw_only=True, slots=True)
class AnalyticOptions:
    """Training choices the analytic model needs beyond the model and hardware shapes."""

    zero_stage: int | str = 0
    """ZeRO stage: 0 = nothing sharded, 1 = optimizer states, 2 = + gradients, 3 = + weights
    (each tensor/pipeline shard split over the ranks that hold it). ``"world"`` = the bundled
    runtime's layout (``strategies.runtime.state``): fp32 master weights, fp32 gradients and
    the optimizer states of the *whole* model split over all ``num_ranks`` ranks whatever the
    layout, plus the layout's compute shard — weights in ``dtype_bytes`` and fp32 gradient
    accumulators — while a step runs: ``P·(optimizer_bytes + 4)/num_ranks + P_rank·(dtype_bytes + 4)``."""
    num_ranks: int | None = None
    """Ranks in the job. With ZeRO stages 1–3, each tensor/pipeline shard of the states is
    split over the ``num_ranks // (tp·pp)`` ranks that hold the same shard (data- and
    context-parallel peers): that is the data-parallel group the optimizer shards over; with
    ``"world"`` over all of them. Required when ``zero_stage`` is not 0; when given, layouts
    larger than the job are unsupported."""
    vocab_parallel: bool = True
    """Embedding, LM head and logits split over the tp ranks (Megatron, and the bundled
    runtime); ``False``: every tp rank holds and computes all of them."""
    reserve_bytes: int | None = None
    """Memory kept free per rank (CUDA context, NCCL buffers, fragmentation), bytes.
    ``None``: 10 % of the device memory."""
    grad_bytes: int | None = None
    """Bytes per gradient element; ``None``: the model's ``dtype_bytes`` (use 4 for fp32
    gradient accumulation), and 4 with ``zero_stage="world"`` (the runtime's fp32 gradients)."""
    optimizer_bytes: int = 12
    """Optimizer bytes per parameter: fp32 master weights + Adam's two fp32 moments."""
    tp_efficiency: tuple[float, ...] = TP_EFFICIENCY_HYDRAULIS_13B
    """Efficiency of the matmuls (the linear term ``b``) at ``tp = 1, 2, 4, 8, …`` (one entry
    per doubling, the first 1.0). The default is fitted to the Hydraulis 13B / A100 profile
    (``docs/cost_model.md``): with our communication terms it reproduces their per-GPU ``b``
    ratios ×1.15 (tp2pp2), ×1.28 (tp4), ×1.71 (tp8) against tp1. The attention term ``a`` is
    not charged for tp (heads split, each head's kernel is unchanged). Between entries the
    factor is interpolated in ``log2(tp)``; past the last, the last doubling's ratio repeats."""
    cp_efficiency: tuple[float, ...] = CP_EFFICIENCY_DEFAULT
    """Efficiency of both terms at ``cp = 1, 2, 4, 8, …`` (same conventions as
    ``tp_efficiency``). cp splits tokens, not matmul widths, so it costs less than tp: the
    default keeps the former 5 % per doubling (no published per-degree profile; see docs)."""
    efficiency_decay: float | None = None
    """Legacy single-term form: when set, ``efficiency = max(min_efficiency, 1 − δ·log2(tp·cp))``
    on both ``a`` and ``b`` replaces the two tables (``0.05`` was the former default)."""
    min_efficiency: float = 0.25
    """Floor of every efficiency factor."""

    def __post_init__(self) -> None:
        if isinstance(self.zero_stage, bool) or self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"AnalyticOptions: zero_stage={self.zero_stage!r} must be 0, 1, 2, 3 or 'world'")
        if not isinstance(self.vocab_parallel, bool):
            raise ValueError(f"AnalyticOptions: vocab_parallel={self.vocab_parallel!r} must be true or false")
        if self.num_ranks is not None and (isinstance(self.num_ranks, bool) or int(self.num_ranks) < 1):
            raise ValueError(f"AnalyticOptions: num_ranks={self.num_ranks!r} must be a positive integer or None")
        if self.zero_stage != 0 and self.num_ranks is None:
            raise ValueError(
                f"AnalyticOptions: zero_stage={self.zero_stage} shards states over data-parallel ranks; "
                "pass num_ranks (the job's rank count) or use zero_stage=0"
            )
        for name in ("reserve_bytes", "grad_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"AnalyticOptions: {name}={v!r} must be a non-negative integer or None")
        if isinstance(self.optimizer_bytes, bool) or not isinstance(self.optimizer_bytes, int) or self.optimizer_bytes < 0:
            raise ValueError(
                f"AnalyticOptions: optimizer_bytes={self.optimizer_bytes!r} must be a non-negative integer (Adam: 12)"
            )
        for name in ("tp_efficiency", "cp_efficiency"):
            object.__setattr__(self, name, _efficiency_table(name, getattr(self, name)))
        d = self.efficiency_decay
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and 0 <= d < 1)):
            raise ValueError(
                f"AnalyticOptions: efficiency_decay={d!r} must be in [0, 1) (e.g. 0.05) or None (use the tp/cp tables)"
            )
        if not (math.isfinite(self.min_efficiency) and 0 < self.min_efficiency <= 1):
            raise ValueError(f"AnalyticOptions: min_efficiency={self.min_efficiency!r} must be in (0, 1] (e.g. 0.25)")

    def efficiency(self, tp: int, cp: int = 1) -> float:
        """Fraction of ``peak · mfu`` the matmuls (linear term ``b``) reach on a ``tp × cp`` split
        of one stage: ``tp_efficiency(tp) · cp_efficiency(cp)``, or the legacy
        ``1 − δ·log2(tp·cp)`` when ``efficiency_decay`` is set; never below ``min_efficiency``."""
        if self.efficiency_decay is not None:
            return max(self.min_efficiency, 1.0 - self.efficiency_decay * math.log2(tp * cp))
        return max(self.min_efficiency, _table_factor(self.tp_efficiency, tp) * _table_factor(self.cp_efficiency, cp))

    def attention_efficiency(self, tp: int, cp: int = 1) -> float:
        """Fraction of ``peak · mfu`` causal attention (quadratic term ``a``) reaches:
        ``cp_efficiency(cp)`` (tp splits heads, leaving each head's kernel as it was), or the
        legacy ``1 − δ·log2(tp·cp)`` when ``efficiency_decay`` is set."""
        if self.efficiency_decay is not None:
            return self.efficiency(tp, cp)
        return max(self.min_efficiency, _table_factor(self.cp_efficiency, cp))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("tp_efficiency", "cp_efficiency"):
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AnalyticOptions":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"AnalyticOptions: unknown keys {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**dict(d))
