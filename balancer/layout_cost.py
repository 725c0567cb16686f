"""One layout's cost coefficients and the replica-time formula, shared by every cost source.

A small module of its own so that the sources (:mod:`balancer.analytic`,
:mod:`balancer.fit`, :mod:`balancer.calibrate`) and :class:`balancer.cost.CostModel`,
which composes them, import it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from strategies.layout import Layout

__all__ = ["LayoutCost", "LayoutKey", "UnsupportedLayoutError", "as_layout", "replica_seconds"]

LayoutKey = Layout | str
"""A layout or its name (``"tp2cp2"``)."""


class UnsupportedLayoutError(ValueError):
    """A cost model cannot price a layout: unknown to a coefficient table, the model's shape
    does not split that way (tp not dividing the heads), or not one token fits in memory."""


def as_layout(key: LayoutKey) -> Layout:
    return key if isinstance(key, Layout) else Layout.parse(str(key))


@dataclass(frozen=True, slots=True)
class LayoutCost:
    """Coefficients of one layout. Times in seconds (or any one unit used consistently)."""

    a: float
    """Quadratic coefficient, seconds per token² (attention)."""
    b: float
    """Linear coefficient, seconds per token (matmuls, norms, communication per token)."""
    c: float
    """Fixed overhead per micro-batch, seconds (kernel launches, pipeline bubbles' fixed part)."""
    token_capacity: int
    """Most tokens one micro-batch may hold on this layout (memory model)."""
    d: float = 0.0
    """Overhead per sequence in a micro-batch, seconds (per-sequence attention launches,
    position and mask set-up); 0 for models that predate it (cost-model JSON version 1)."""

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "d"):
            raw = getattr(self, name)
            if isinstance(raw, (bool, str)) or not isinstance(raw, (int, float, np.integer, np.floating)):
                raise ValueError(f"LayoutCost: {name}={raw!r} must be a number of seconds (finite, >= 0)")
            v = float(raw)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"LayoutCost: {name}={v} must be finite and >= 0")
            object.__setattr__(self, name, v)
        raw_cap = self.token_capacity
        if isinstance(raw_cap, (bool, str)) or not isinstance(raw_cap, (int, float, np.integer, np.floating)) or (
            not float(raw_cap).is_integer()
        ):
            raise ValueError(
                f"LayoutCost: token_capacity={raw_cap!r} must be a whole number of tokens per micro-batch "
                "(never rounded: a capacity the memory model did not give could overflow memory)"
            )
        cap = int(raw_cap)
        if cap < 1:
            raise ValueError(
                f"LayoutCost: token_capacity={self.token_capacity} must be >= 1 token; "
                "the layout cannot hold even one token (raise memory or parallel degrees)"
            )
        object.__setattr__(self, "token_capacity", cap)

    def seconds(self, lengths: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Per-sequence time ``t(s) = a·s² + b·s + d`` (float64, same shape as ``lengths``).

        The per-sequence overhead ``d`` is part of every sequence's time, so a micro-batch
        costs ``T(m) = Σ_{i∈m} t(s_i)`` and every consumer of per-item times (stage 1,
        stage 2, the packers, the bounds) prices it without knowing it is there."""
        s = np.asarray(lengths, dtype=np.float64)
        return self.a * s * s + self.b * s + self.d

    def micro_batch_seconds(self, lengths: np.ndarray | Sequence[int]) -> float:
        """Time of one micro-batch holding sequences of ``lengths`` tokens, alone:
        ``Σ_i (a·s_i² + b·s_i + d) + c`` (what calibration measures and fits)."""
        s = np.asarray(lengths, dtype=np.float64)
        return float(self.seconds(s).sum()) + self.c

    def to_dict(self) -> dict[str, float | int]:
        return {"a": self.a, "b": self.b, "c": self.c, "d": self.d, "token_capacity": self.token_capacity}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayoutCost":
        """From :meth:`to_dict`; ``d`` may be missing (version-1 files: no per-sequence term)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"LayoutCost: expected an object with a, b, c, token_capacity, got {type(d).__name__} {d!r}")
        missing = {"a", "b", "c", "token_capacity"} - set(d)
        if missing:
            raise ValueError(f"LayoutCost: missing keys {sorted(missing)} in {dict(d)}")
        unknown = set(d) - {"a", "b", "c", "d", "token_capacity"}
        if unknown:
            raise ValueError(f"LayoutCost: unknown keys {sorted(unknown)} in {dict(d)}; expected a, b, c, d, token_capacity")
        return cls(a=d["a"], b=d["b"], c=d["c"], d=d.get("d", 0.0), token_capacity=d["token_capacity"])


def replica_seconds(
    micro_batch_seconds: Sequence[float] | np.ndarray, c: float, pp: int, speed: float = 1.0
) -> float:
    """Replica time of micro-batches with times ``T(m_k)`` (1F1B pipeline).

    ``(Σ_k T(m_k) + v·c + (pp−1)·max_k T(m_k)) / speed``, ``T(m) = Σ_{i∈m} (a·s_i² + b·s_i + d)``
    (:meth:`LayoutCost.seconds` summed). An empty list costs 0.
    """
    t = np.asarray(micro_batch_seconds, dtype=np.float64)
    if t.size == 0:
        return 0.0
    return float((t.sum() + t.size * c + (pp - 1) * t.max()) / speed)
