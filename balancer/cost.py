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
(:meth:`CostModel.calibrate`). Every source resolves to a table of :class:`LayoutCost`.

JSON (:meth:`CostModel.to_dict`) is version :data:`COST_MODEL_VERSION` (2: ``d`` per
layout); version-1 files, written before the per-sequence term, still load with ``d = 0``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from strategies.layout import Layout

from . import calibrate as cal
from .analytic import AnalyticModel
from .analytic_options import AnalyticOptions
from .data import INSTANCES_FILE
from .fit import fit_quadratic
from .layout_cost import (
    LayoutCost,
    LayoutKey,
    UnsupportedLayoutError,
    as_layout,
    replica_seconds,
)
from .specs import HardwareSpec, ModelSpec, hardware_preset, model_preset

__all__ = ["COST_MODEL_VERSION", "LayoutCost", "CostModel", "UnsupportedLayoutError", "replica_seconds"]

COST_MODEL_VERSION = 2
"""Version of :meth:`CostModel.to_dict`: 2 adds ``d`` (seconds per sequence) to every layout.
Version 1 (no ``d``) is still read, with ``d = 0``."""
_READABLE_VERSIONS = (1, 2)


class CostModel:
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

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_coefficients(
        cls, table: Mapping[Layout | str, LayoutCost | Mapping[str, Any] | Sequence[float]], **meta: Any
    ) -> "CostModel":
        """Explicit coefficients per layout.

        Values may be :class:`LayoutCost`, dicts with ``a, b, c, token_capacity`` (and
        optionally ``d``) or tuples ``(a, b, c, token_capacity)`` / ``(a, b, c,
        token_capacity, d)`` (``d`` appended, so older 4-tuples keep their meaning); keys may
        be layouts or names like ``"tp4"``.
        """
        out: dict[Layout, LayoutCost] = {}
        for key, val in table.items():
            lay = key if isinstance(key, Layout) else Layout.parse(str(key))
            if isinstance(val, LayoutCost):
                out[lay] = val
            elif isinstance(val, Mapping):
                out[lay] = LayoutCost.from_dict(val)
            else:
                vals = tuple(val)
                if len(vals) not in (4, 5):
                    raise ValueError(
                        f"from_coefficients: {lay.name} has {len(vals)} values {vals}; give (a, b, c, token_capacity) "
                        "or (a, b, c, token_capacity, d)"
                    )
                a, b, c, cap = vals[:4]
                out[lay] = LayoutCost(a=a, b=b, c=c, token_capacity=cap, d=vals[4] if len(vals) == 5 else 0.0)
        return cls(out, source="coefficients", meta=meta)

    @classmethod
    def from_hydraulis_instance(cls, path: str | Path | None = None, *, unit: str = "ms") -> "CostModel":
        """Coefficients from a Hydraulis instance file (default: the bundled
        :data:`balancer.data.INSTANCES_FILE`, the published 13B numbers).

        The file lists replicas with ``tp, pp, a, b, c, max_seqlen`` in **milliseconds**;
        each distinct ``(tp, pp)`` becomes ``Layout(tp, 1, pp)`` with ``token_capacity =
        max_seqlen``. ``unit="ms"`` keeps the file's numbers (``meta["time_unit"] = "ms"``);
        ``unit="s"`` converts them to seconds. Replicas of one layout must agree.
        """


        if unit not in ("ms", "s"):
            raise ValueError(f"from_hydraulis_instance: unit={unit!r} must be 'ms' (as in the file) or 's'")
        p = Path(path) if path is not None else INSTANCES_FILE
        if not p.is_file():
            raise ValueError(f"Hydraulis instance file {str(p)!r} does not exist")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"Hydraulis instance file {str(p)!r} is not valid JSON: {e}") from None
        replicas = d.get("replicas") if isinstance(d, dict) else None
        if not isinstance(replicas, list) or not replicas:
            raise ValueError(f"Hydraulis instance file {str(p)!r} has no 'replicas' list")
        scale = 1.0 if unit == "ms" else 1e-3
        table: dict[Layout, LayoutCost] = {}
        for j, rep in enumerate(replicas):
            missing = {"tp", "pp", "a", "b", "c", "max_seqlen"} - set(rep)
            if missing:
                raise ValueError(f"{p.name}: replica {j} lacks {sorted(missing)}")
            lay = Layout(tp=int(rep["tp"]), cp=1, pp=int(rep["pp"]))
            cost = LayoutCost(
                a=rep["a"] * scale, b=rep["b"] * scale, c=rep["c"] * scale, token_capacity=int(rep["max_seqlen"])
            )
            if table.setdefault(lay, cost) != cost:
                raise ValueError(
                    f"{p.name}: replica {j} gives {lay.name} coefficients {cost.to_dict()} but an earlier "
                    f"replica gave {table[lay].to_dict()}; one layout must have one set of coefficients"
                )
        meta = {"time_unit": unit, "origin": p.name, "description": str(d.get("source", ""))}
        return cls(table, source="coefficients", meta=meta)

    @classmethod
    def analytic(
        cls,
        model: "ModelSpec | str",
        hardware: "HardwareSpec | str",
        options: "AnalyticOptions | None" = None,
        **option_values: Any,
    ) -> "CostModel":
        """Analytic coefficients and memory capacity for any layout (see :mod:`balancer.analytic`).

        ``model`` and ``hardware`` are specs or preset names (``"llama-7b"``, ``"h100-80g"``).
        Options are an :class:`~balancer.analytic_options.AnalyticOptions` or its fields as keywords:
        ``zero_stage``, ``num_ranks``, ``reserve_bytes``, ``grad_bytes``, ``optimizer_bytes``,
        ``tp_efficiency``, ``cp_efficiency``, ``efficiency_decay`` (legacy single-term form),
        ``min_efficiency``. Layouts are priced on first use and cached;
        the specs go into ``meta`` so :meth:`from_dict` rebuilds the same resolver.
        """

        if options is not None and option_values:
            raise ValueError("CostModel.analytic: pass either options=AnalyticOptions(...) or keywords, not both")
        opts = options if options is not None else AnalyticOptions.from_dict(option_values)
        spec = model_preset(model) if isinstance(model, str) else model
        hw = hardware_preset(hardware) if isinstance(hardware, str) else hardware
        engine = AnalyticModel(spec, hw, opts)
        return cls(source="analytic", resolver=engine.layout_cost, meta=engine.meta())

    @classmethod
    def fit(
        cls,
        lengths: Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
        seconds: Sequence[float] | np.ndarray,
        *,
        token_capacity: int,
        layout: LayoutKey = Layout(),
        c: float | None = None,
        d: float | None = None,
        time_unit: str = "s",
    ) -> "CostModel":
        """Non-negative least-squares fit of one layout's ``a, b`` (and ``c``, ``d`` when ``None``).

        ``lengths``: one length per sample (a micro-batch of one sequence) or one list of
        lengths per sample (a micro-batch of several); ``seconds``: each sample's measured
        time. The model is ``a·Σs² + b·Σs + d·n + c`` for ``n`` sequences
        (:func:`balancer.fit.fit_quadratic`: ``d`` is fitted only when the samples hold
        different sequence counts, else 0). ``token_capacity`` comes from the caller
        (memory is not measured here). R² and the residuals go into ``meta["fit"]``
        (:meth:`fit_r2`).
        """
        return cls.fit_layouts(
            {as_layout(layout): (lengths, seconds)}, token_capacity=token_capacity, c=c, d=d, time_unit=time_unit
        )

    @classmethod
    def fit_layouts(
        cls,
        samples: Mapping[LayoutKey, tuple[Any, Any]],
        *,
        token_capacity: int | Mapping[LayoutKey, int],
        c: float | None | Mapping[LayoutKey, float | None] = None,
        d: float | None = None,
        time_unit: str = "s",
    ) -> "CostModel":
        """:meth:`fit` for several layouts at once: ``{layout: (lengths, seconds)}``.

        ``token_capacity`` and ``c`` are one value for all layouts or a dict per layout;
        ``d`` (``None``: fitted where the samples allow) applies to every layout.
        """

        if not samples:
            raise ValueError("CostModel.fit_layouts: no samples; give {layout: (lengths, seconds)}")
        caps = {as_layout(k): v for k, v in token_capacity.items()} if isinstance(token_capacity, Mapping) else None
        cs = {as_layout(k): v for k, v in c.items()} if isinstance(c, Mapping) else None
        table: dict[Layout, LayoutCost] = {}
        fits: dict[str, dict[str, Any]] = {}
        for key, pair in samples.items():
            lay = as_layout(key)
            if caps is not None and lay not in caps:
                raise ValueError(f"CostModel.fit_layouts: no token_capacity for layout {lay.name}")
            cap = caps[lay] if caps is not None else token_capacity
            c_lay = cs.get(lay) if cs is not None else c
            try:
                lengths, seconds = pair
            except (TypeError, ValueError):
                raise ValueError(f"CostModel.fit_layouts: samples[{lay.name}] must be a pair (lengths, seconds)") from None
            try:
                res = fit_quadratic(lengths, seconds, c=c_lay, d=d)
            except ValueError as e:
                raise ValueError(f"layout {lay.name}: {e}") from None
            table[lay] = LayoutCost(a=res.a, b=res.b, c=res.c, d=res.d, token_capacity=int(cap))  # type: ignore[arg-type]
            fits[lay.name] = res.to_dict()
        return cls(table, source="fit", meta={"time_unit": time_unit, "fit": fits})

    @classmethod
    def calibrate(
        cls,
        model: "ModelSpec | str | None" = "tiny",
        *,
        micro_batches: Sequence[int | Sequence[int]] | None = None,
        token_budget: int | None = None,
        length_pool: Sequence[int] | np.ndarray | None = None,
        layout: LayoutKey = Layout(),
        step_fn: Callable[[tuple[int, ...]], None] | None = None,
        num_layers: int | None = None,
        token_capacity: int | None = None,
        hardware: "HardwareSpec | str | None" = None,
        warmup: int = 1,
        repeats: int = 5,
        statistic: str = "min",
        clock: str = "wall",
        num_threads: int | None = None,
        seed: int = 0,
        attention: str = "auto",
        progress: bool | None = None,
        log: Callable[[str], None] | None = None,
    ) -> "CostModel":
        """Time forward + backward of packed micro-batches on the local device, then fit
        ``a, b, c, d`` (:mod:`balancer.calibrate`).

        By default the packed Llama-style decoder of ``model`` (a spec or preset name;
        :mod:`balancer.decoder`) is built on the device — CUDA when available, else the
        CPU; bf16 on CUDA when ``dtype_bytes == 2``, fp32 on the CPU — and times the
        compositions of :func:`~balancer.calibrate.calibration_micro_batches` under
        ``token_budget`` tokens (default 2,048 on the CPU, 16,384 on a GPU, at most the
        token capacity), with micro-batches drawn from ``length_pool`` (a length file's
        lengths) when given. ``micro_batches`` (lengths, or lists of lengths) replaces the
        compositions. ``step_fn(micro_batch)`` replaces the decoder to time your own model
        (it receives a tuple of lengths and need not synchronise). ``num_layers=N`` times an
        ``N``-layer copy (and depth 0) and scales to the model's depth. ``token_capacity=None``
        takes the analytic memory model of ``model`` on ``hardware`` (default: this device's
        preset with its real memory size). ``statistic``: ``"min"`` (default) or
        ``"median"`` of ``repeats`` runs; ``num_threads`` sets torch's CPU threads (restored
        afterwards); ``clock="process"`` times CPU work by the process's CPU time (with
        ``num_threads=1`` the robust choice on a shared machine); ``attention``: ``auto``,
        ``varlen`` or ``sdpa`` (:func:`~balancer.decoder.attention_backend`). ``meta``
        records the device, torch version, kernel, every micro-batch with its measured
        and fitted time, R², and ``reliable`` / ``problems``; an unreliable fit also
        raises a :class:`~balancer.calibrate.CalibrationWarning`.
        """
        lay = as_layout(layout)
        spec = model_preset(model) if isinstance(model, str) else model
        hw = hardware_preset(hardware) if isinstance(hardware, str) else hardware
        cost, meta = cal.calibrate_layout(
            spec, layout=lay, micro_batches=micro_batches, token_budget=token_budget, length_pool=length_pool,
            step_fn=step_fn, num_layers=num_layers, token_capacity=token_capacity, hardware=hw, warmup=warmup,
            repeats=repeats, statistic=statistic, clock=clock, num_threads=num_threads, seed=seed,
            attention=attention, progress=progress, log=log,
        )
        return cls({lay: cost}, source="calibrated", meta=meta)

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
