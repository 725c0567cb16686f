"""The cost model: how long a sequence takes on a layout, and how many tokens fit.

Per :class:`~strategies.Layout` the model gives three coefficients and a capacity:

    t(s) = a·s² + b·s        seconds for one sequence of ``s`` tokens (forward + backward)
    c                         seconds of fixed overhead per micro-batch
    token_capacity            tokens one micro-batch may hold (from the memory model)

and the replica time of micro-batches ``m_1..m_v`` on a layout with pipeline degree pp
(1F1B) is ``Σ_k T(m_k) + v·c + (pp−1)·max_k T(m_k)`` with ``T(m) = Σ_{i∈m} t(s_i)``,
divided by the replica's relative speed (its slowest rank).

One type, several sources: explicit coefficients (:meth:`CostModel.from_coefficients`),
analytic from model and hardware specs (:meth:`CostModel.analytic`), least-squares fits
of measurements (:meth:`CostModel.fit`) and calibration on the local device
(:meth:`CostModel.calibrate`). Every source resolves to a table of :class:`LayoutCost`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from strategies.layout import Layout

__all__ = ["LayoutCost", "CostModel", "replica_seconds"]


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

    def __post_init__(self) -> None:
        for name in ("a", "b", "c"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"LayoutCost: {name}={v} must be finite and >= 0")
            object.__setattr__(self, name, v)
        cap = int(self.token_capacity)
        if cap < 1:
            raise ValueError(
                f"LayoutCost: token_capacity={self.token_capacity} must be >= 1 token; "
                "the layout cannot hold even one token (raise memory or parallel degrees)"
            )
        object.__setattr__(self, "token_capacity", cap)

    def seconds(self, lengths: np.ndarray | Sequence[int] | int) -> np.ndarray:
        """Per-sequence time ``a·s² + b·s`` (float64, same shape as ``lengths``)."""
        s = np.asarray(lengths, dtype=np.float64)
        return self.a * s * s + self.b * s

    def to_dict(self) -> dict[str, float | int]:
        return {"a": self.a, "b": self.b, "c": self.c, "token_capacity": self.token_capacity}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayoutCost":
        missing = {"a", "b", "c", "token_capacity"} - set(d)
        if missing:
            raise ValueError(f"LayoutCost: missing keys {sorted(missing)} in {dict(d)}")
        return cls(a=d["a"], b=d["b"], c=d["c"], token_capacity=d["token_capacity"])


def replica_seconds(
    micro_batch_seconds: Sequence[float] | np.ndarray, c: float, pp: int, speed: float = 1.0
) -> float:
    """Replica time of micro-batches with times ``T(m_k)`` (1F1B pipeline).

    ``(Σ_k T(m_k) + v·c + (pp−1)·max_k T(m_k)) / speed``. An empty list costs 0.
    """
    t = np.asarray(micro_batch_seconds, dtype=np.float64)
    if t.size == 0:
        return 0.0
    return float((t.sum() + t.size * c + (pp - 1) * t.max()) / speed)


class CostModel:
    """Per-layout cost coefficients from one source.

    ``table`` holds explicitly known layouts; ``resolver`` (analytic models) derives any
    other layout on demand and caches it. ``source`` names where the numbers came from
    (``"coefficients"``, ``"analytic"``, ``"fit"``, ``"calibrated"``); ``meta`` holds what is
    needed to rebuild the model from JSON (specs, fit quality, device name).
    """

    def __init__(
        self,
        table: Mapping[Layout, LayoutCost] | None = None,
        *,
        source: str = "coefficients",
        resolver: Callable[[Layout], LayoutCost] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self._table: dict[Layout, LayoutCost] = dict(table or {})
        for lay, cost in self._table.items():
            if not isinstance(lay, Layout) or not isinstance(cost, LayoutCost):
                raise ValueError("CostModel: table must map Layout → LayoutCost")
        if not self._table and resolver is None:
            raise ValueError("CostModel: give at least one layout's coefficients or a resolver")
        self.source = source
        self._resolver = resolver
        self.meta: dict[str, Any] = dict(meta or {})

    # -- lookup ---------------------------------------------------------------------------
    @property
    def layouts(self) -> list[Layout]:
        """Layouts resolved so far (all of them for table-only models)."""
        return sorted(self._table)

    def supports(self, layout: Layout) -> bool:
        return layout in self._table or self._resolver is not None

    def cost(self, layout: Layout) -> LayoutCost:
        """Coefficients of ``layout``; raises ``ValueError`` for a layout this model cannot price."""
        got = self._table.get(layout)
        if got is not None:
            return got
        if self._resolver is None:
            known = ", ".join(lay.name for lay in sorted(self._table)) or "none"
            raise ValueError(
                f"cost model ({self.source}) has no coefficients for layout {layout.name}; "
                f"known layouts: {known}. Fit or calibrate that layout, or use an analytic model"
            )
        got = self._resolver(layout)
        self._table[layout] = got
        return got

    def seconds(self, lengths: np.ndarray | Sequence[int], layout: Layout) -> np.ndarray:
        """Per-sequence seconds ``a·s² + b·s`` on ``layout`` (vectorised)."""
        return self.cost(layout).seconds(lengths)

    def token_capacity(self, layout: Layout) -> int:
        return self.cost(layout).token_capacity

    def replica_seconds(
        self, micro_batches: Iterable[np.ndarray | Sequence[int]], layout: Layout, speed: float = 1.0
    ) -> float:
        """Replica time of micro-batches given as arrays of sequence lengths (tokens)."""
        cost = self.cost(layout)
        times = [float(cost.seconds(np.asarray(m)).sum()) for m in micro_batches]
        return replica_seconds(times, cost.c, layout.pp, speed)

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_coefficients(
        cls, table: Mapping[Layout | str, LayoutCost | Mapping[str, Any] | Sequence[float]], **meta: Any
    ) -> "CostModel":
        """Explicit coefficients per layout.

        Values may be :class:`LayoutCost`, dicts with ``a, b, c, token_capacity`` or tuples
        ``(a, b, c, token_capacity)``; keys may be layouts or names like ``"tp4"``.
        """
        out: dict[Layout, LayoutCost] = {}
        for key, val in table.items():
            lay = key if isinstance(key, Layout) else Layout.parse(str(key))
            if isinstance(val, LayoutCost):
                out[lay] = val
            elif isinstance(val, Mapping):
                out[lay] = LayoutCost.from_dict(val)
            else:
                a, b, c, cap = val
                out[lay] = LayoutCost(a=a, b=b, c=c, token_capacity=int(cap))
        return cls(out, source="coefficients", meta=meta)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self, layouts: Iterable[Layout] | None = None) -> dict[str, Any]:
        """JSON-ready dict. ``layouts`` forces those layouts to be resolved and written."""
        for lay in layouts or ():
            self.cost(lay)
        return {
            "version": 1,
            "source": self.source,
            "meta": self.meta,
            "layouts": {lay.name: self._table[lay].to_dict() for lay in sorted(self._table)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CostModel":
        if int(d.get("version", 1)) != 1:
            raise ValueError(f"cost model JSON version {d.get('version')} is not supported (expected 1)")
        table = {Layout.parse(k): LayoutCost.from_dict(v) for k, v in dict(d.get("layouts", {})).items()}
        meta = dict(d.get("meta", {}))
        source = str(d.get("source", "coefficients"))
        rebuild = _REBUILDERS.get(source)
        if rebuild is not None:
            return rebuild(table, meta)
        return cls(table, source=source, meta=meta)

    def save(self, path: str | Path, layouts: Iterable[Layout] | None = None) -> None:
        Path(path).write_text(json.dumps(self.to_dict(layouts), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"cost model file {str(p)!r} does not exist")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"cost model file {str(p)!r} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def __repr__(self) -> str:
        lays = ", ".join(lay.name for lay in self.layouts)
        return f"CostModel(source={self.source!r}, layouts=[{lays}])"


# Sources whose JSON carries enough to rebuild a resolver (e.g. analytic specs) register here:
# name -> function(table, meta) -> CostModel.
_REBUILDERS: dict[str, Callable[[dict[Layout, LayoutCost], dict[str, Any]], CostModel]] = {}
