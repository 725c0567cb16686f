"""The cost model: how long a sequence takes on a layout, and how many tokens fit.

Per :class:`~strategies.Layout` the model gives four coefficients and a capacity:

    t(s) = a·s² + b·s + d    seconds for one sequence of ``s`` tokens (forward + backward),
                              ``d`` the overhead every sequence adds to its micro-batch
    c                         seconds of fixed overhead per micro-batch
    token_capacity            tokens one micro-batch may hold (from the memory model)

and the replica time of micro-batches ``m_1..m_v`` on a layout with pipeline degree pp
(1F1B) is ``Σ_k T(m_k) + v·c + (pp−1)·max_k T(m_k)`` with ``T(m) = Σ_{i∈m} t(s_i)``,
divided by the replica's relative speed (its slowest rank).

One type, several sources: explicit coefficients (:meth:`CostModel.from_coefficients`),
analytic from model and hardware specs (:meth:`CostModel.analytic`), least-squares fits
of measurements (:meth:`CostModel.fit`) and calibration on the local device
(:meth:`CostModel.calibrate`). Every source resolves to a table of :class:`LayoutCost`;
the constructors are in :mod:`balancer.cost_sources`.

JSON (:meth:`CostModel.to_dict`) is version :data:`COST_MODEL_VERSION` (2: ``d`` per
layout); version-1 files, written before the per-sequence term, still load with ``d = 0``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from strategies.layout import Layout

from .analytic import AnalyticModel
from .analytic_options import AnalyticOptions
from .cost_sources import CostModelSources
from .layout_cost import (
    LayoutCost,
    LayoutKey,
    UnsupportedLayoutError,
    as_layout,
    replica_seconds,
)
from .specs import HardwareSpec, ModelSpec

__all__ = ["COST_MODEL_VERSION", "LayoutCost", "CostModel", "UnsupportedLayoutError", "replica_seconds"]

COST_MODEL_VERSION = 2
"""Version of :meth:`CostModel.to_dict`: 2 adds ``d`` (seconds per sequence) to every layout.
Version 1 (no ``d``) is still read, with ``d = 0``."""
_READABLE_VERSIONS = (1, 2)


class CostModel(CostModelSources):
    """Per-layout cost coefficients from one source.

    ``table`` holds explicitly known layouts; ``resolver`` (analytic models) derives any
    other layout on demand and caches it; a resolver refuses a layout by raising
    ``ValueError`` (best: :class:`UnsupportedLayoutError`). ``source`` names where the numbers came from
    (``"coefficients"``, ``"analytic"``, ``"fit"``, ``"calibrated"``); ``meta`` holds what is
    needed to rebuild the model from JSON (specs, fit quality, device name) and the time
    unit (``meta["time_unit"]``, ``"s"`` unless stated, ``"ms"`` for Hydraulis files).

    A layout the model cannot price — not in the table and no resolver, or rejected by the
    resolver (e.g. the weights alone overflow memory) — makes :meth:`supports` return
    ``False`` and :meth:`cost` raise :class:`UnsupportedLayoutError` (a ``ValueError``)
    with the reason; :meth:`unsupported_reason` returns it without raising. Every
    :class:`LayoutCost` therefore holds at least one token.
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
        self._unsupported: dict[Layout, str] = {}
        self.meta: dict[str, Any] = dict(meta or {})

    # -- lookup ---------------------------------------------------------------------------
    @property
    def layouts(self) -> list[Layout]:
        """Layouts resolved so far (all of them for table-only models)."""
        return sorted(self._table)

    @property
    def time_unit(self) -> str:
        """Unit of ``a, b, c`` and of every time this model returns (``"s"`` or ``"ms"``)."""
        return str(self.meta.get("time_unit", "s"))

    def supports(self, layout: Layout) -> bool:
        """``True`` when :meth:`cost` can price ``layout`` (resolving and caching it)."""
        return self.unsupported_reason(layout) is None

    def unsupported_reason(self, layout: Layout) -> str | None:
        """Why ``layout`` cannot be priced, or ``None`` when it can."""
        try:
            self.cost(layout)
        except UnsupportedLayoutError as e:
            return str(e)
        return None

    def cost(self, layout: Layout) -> LayoutCost:
        """Coefficients of ``layout``; raises :class:`UnsupportedLayoutError` (a ``ValueError``)
        for a layout this model cannot price, with the reason and the fix."""
        got = self._table.get(layout)
        if got is not None:
            return got
        reason = self._unsupported.get(layout)
        if reason is not None:
            raise UnsupportedLayoutError(reason)
        if self._resolver is None:
            known = ", ".join(lay.name for lay in sorted(self._table)) or "none"
            raise UnsupportedLayoutError(
                f"cost model ({self.source}) has no coefficients for layout {layout.name}; "
                f"known layouts: {known}. Fit or calibrate that layout, or use an analytic model"
            )
        try:
            got = self._resolver(layout)
        except ValueError as e:  # a resolver's way of saying "cannot price this layout"
            self._unsupported[layout] = str(e)
            if isinstance(e, UnsupportedLayoutError):
                raise
            raise UnsupportedLayoutError(str(e)) from e
        self._table[layout] = got
        return got

    def fit_r2(self, layout: LayoutKey) -> float:
        """R² of the least-squares fit behind ``layout``'s coefficients (fit and calibrated models)."""
        lay = as_layout(layout)
        fits = self.meta.get("fit", {})
        if lay.name not in fits:
            have = ", ".join(sorted(fits)) or "none"
            raise ValueError(
                f"cost model ({self.source}) has no fit for layout {lay.name} (fitted layouts: {have}); "
                "R² exists only for models built by CostModel.fit, fit_layouts or calibrate"
            )
        return float(fits[lay.name]["r2"])

    def seconds(self, lengths: np.ndarray | Sequence[int], layout: Layout) -> np.ndarray:
        """Per-sequence seconds ``a·s² + b·s + d`` on ``layout`` (vectorised)."""
        return self.cost(layout).seconds(lengths)

    def token_capacity(self, layout: Layout) -> int:
        return self.cost(layout).token_capacity

    def measured_tokens(self, layout: LayoutKey) -> int | None:
        """The largest micro-batch (tokens) whose time was measured for ``layout``, or ``None``.

        Fitted and calibrated models know it (``meta["fit"]``, or the calibrated lengths of
        older files); beyond it their ``a·s² + b·s + c`` extrapolates. Analytic models and
        given coefficients measured nothing: ``None``.
        """
        lay = as_layout(layout)
        fit = self.meta.get("fit", {}).get(lay.name, {})
        if fit.get("max_tokens"):
            return int(fit["max_tokens"])
        if self.source == "calibrated" and self.meta.get("lengths"):
            return int(max(self.meta["lengths"]))
        return None

    def replica_seconds(
        self, micro_batches: Iterable[np.ndarray | Sequence[int]], layout: Layout, speed: float = 1.0
    ) -> float:
        """Replica time of micro-batches given as arrays of sequence lengths (tokens)."""
        cost = self.cost(layout)
        times = [float(cost.seconds(np.asarray(m)).sum()) for m in micro_batches]
        return replica_seconds(times, cost.c, layout.pp, speed)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self, layouts: Iterable[Layout] | None = None) -> dict[str, Any]:
        """JSON-ready dict. ``layouts`` forces those layouts to be resolved and written."""
        for lay in layouts or ():
            self.cost(lay)
        return {
            "version": COST_MODEL_VERSION,
            "source": self.source,
            "meta": self.meta,
            "layouts": {lay.name: self._table[lay].to_dict() for lay in sorted(self._table)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CostModel":
        if not isinstance(d, Mapping):
            raise ValueError(
                f"cost model JSON must be an object with 'layouts' (what CostModel.save writes), got {type(d).__name__}"
            )
        version = d.get("version", 1)
        if version not in _READABLE_VERSIONS:
            raise ValueError(
                f"cost model JSON version {version!r} is not supported (this hydraulis reads versions "
                f"{', '.join(map(str, _READABLE_VERSIONS))}); upgrade hydraulis or re-save the model"
            )
        layouts, meta = d.get("layouts", {}), d.get("meta", {})
        if not isinstance(layouts, Mapping) or not isinstance(meta, Mapping):
            raise ValueError(
                "cost model JSON: 'layouts' and 'meta' must be objects (layout name -> {a, b, c, d, token_capacity})"
            )
        table = {}
        for k, v in layouts.items():
            try:
                table[Layout.parse(k)] = LayoutCost.from_dict(v)
            except ValueError as e:
                raise ValueError(f"cost model JSON, layout {k!r}: {e}") from None
        meta = dict(meta)
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


def _rebuild_analytic(table: dict[Layout, LayoutCost], meta: dict[str, Any]) -> CostModel:
    """The analytic resolver from the specs stored in ``meta``; stored layouts are kept as written."""

    missing = {"model", "hardware", "options"} - set(meta)
    if missing:
        raise ValueError(f"analytic cost model JSON lacks meta keys {sorted(missing)}; save it with CostModel.save")
    engine = AnalyticModel(
        ModelSpec.from_dict(meta["model"]),
        HardwareSpec.from_dict(meta["hardware"]),
        AnalyticOptions.from_dict(meta["options"]),
    )
    return CostModel(table, source="analytic", resolver=engine.layout_cost, meta=meta)


# Sources whose JSON carries enough to rebuild a resolver (e.g. analytic specs) register here:
# name -> function(table, meta) -> CostModel.
_REBUILDERS: dict[str, Callable[[dict[Layout, LayoutCost], dict[str, Any]], CostModel]] = {
    "analytic": _rebuild_analytic,
}
