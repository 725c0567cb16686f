"""Where a cost model's numbers come from: the constructors of :class:`balancer.cost.CostModel`.

One type, several sources, each resolving to a table of :class:`LayoutCost` (or, for the
analytic model, a resolver that prices any layout on demand):

* :meth:`~CostModelSources.from_coefficients` — explicit ``a, b, c, token_capacity`` (``d``);
* :meth:`~CostModelSources.from_hydraulis_instance` — a Hydraulis instance file (milliseconds);
* :meth:`~CostModelSources.analytic` — model and hardware specs (:mod:`balancer.analytic`);
* :meth:`~CostModelSources.fit` / :meth:`~CostModelSources.fit_layouts` — least-squares fits
  of measured times (:mod:`balancer.fit`);
* :meth:`~CostModelSources.calibrate` — timing the packed decoder on the local device
  (:mod:`balancer.calibrate`).

``CostModel`` inherits them, so they are called as ``CostModel.fit(...)`` and so on; ``cls``
below is always ``CostModel``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from strategies.layout import Layout

from . import calibrate as cal
from .analytic import AnalyticModel
from .analytic_options import AnalyticOptions
from .data import INSTANCES_FILE
from .fit import fit_quadratic
from .layout_cost import LayoutCost, LayoutKey, as_layout
from .specs import HardwareSpec, ModelSpec, hardware_preset, model_preset

__all__ = ["CostModelSources"]

_Model = TypeVar("_Model", bound="CostModelSources")


class CostModelSources:
    """The constructors of :class:`balancer.cost.CostModel`, one per source of numbers."""

    @classmethod
    def from_coefficients(
        cls: type[_Model], table: Mapping[Layout | str, LayoutCost | Mapping[str, Any] | Sequence[float]], **meta: Any
    ) -> _Model:
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
    def from_hydraulis_instance(cls: type[_Model], path: str | Path | None = None, *, unit: str = "ms") -> _Model:
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
        cls: type[_Model],
        model: "ModelSpec | str",
        hardware: "HardwareSpec | str",
        options: "AnalyticOptions | None" = None,
        **option_values: Any,
    ) -> _Model:
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
        cls: type[_Model],
        lengths: Sequence[int] | Sequence[Sequence[int]] | np.ndarray,
        seconds: Sequence[float] | np.ndarray,
        *,
        token_capacity: int,
        layout: LayoutKey = Layout(),
        c: float | None = None,
        d: float | None = None,
        time_unit: str = "s",
    ) -> _Model:
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
        cls: type[_Model],
        samples: Mapping[LayoutKey, tuple[Any, Any]],
        *,
        token_capacity: int | Mapping[LayoutKey, int],
        c: float | None | Mapping[LayoutKey, float | None] = None,
        d: float | None = None,
        time_unit: str = "s",
    ) -> _Model:
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
        cls: type[_Model],
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
    ) -> _Model:
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
        ``num_threads=1`` the robust choice on a shared machine); ``attention``: ``"auto"``
        — the kernel training runs, :func:`strategies.kernels.choose_kernel` — or a kernel
        name (``flash_attn``, ``varlen``, ``sdpa``). ``meta``
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
