"""Calibration: time packed micro-batches of the real model on the local device and fit
``t(m) = Σ_{i∈m} (a·s_i² + b·s_i + d) + c`` (:meth:`CostModel.calibrate`).

**What is timed.** Micro-batches of several compositions under one token budget
(:func:`calibration_micro_batches`): one sequence of 1/8 up to all of the budget (``a``
and ``b``), the whole budget cut into 4, 16 and 64 equal sequences and a quarter of it in
16 (the same tokens in more sequences: ``d`` apart from ``c``), one long sequence next to
many short ones, and — given a length file — micro-batches drawn from it the way a
sampler would fill them. Each runs forward + backward of the packed decoder of
:mod:`balancer.decoder` (or the user's ``step_fn(micro_batch)``).

**How.** Every micro-batch is warmed up, then all are timed round-robin ``repeats`` times
(a burst of background load hits all alike) and one number per micro-batch is kept: the
minimum by default — interference only ever adds time, so the fastest run is the best
estimate of the work (Python's ``timeit`` reasoning) — or the median. Clocks and device
synchronisation: :mod:`balancer.device`.

**Fit and verdict.** ``a, b, c, d`` by exact non-negative least squares
(:func:`balancer.fit.fit_quadratic`). The fit is *unreliable* — a :class:`CalibrationWarning`,
and ``meta["reliable"] = False`` with the reasons in ``meta["problems"]`` — when its R² is
below :data:`MIN_R2` or the profile is launch-bound (:func:`assess`): then the device
waits on kernel launches, not on the model's work, and the coefficients say little.

**Reduced depth.** ``num_layers=N`` builds and times an ``N``-layer copy of the model
(only its weights exist on the device) at depth ``N`` and at depth 0 (embedding, head and
loss only), and scales every micro-batch's time to the model's ``L`` layers,
``t_L = t_0 + (L/N)·(t_N − t_0)``, before fitting: the per-layer part scales, the rest
does not. A 7B shape thus calibrates from a 4-layer copy (~1 B parameters).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from strategies.layout import Layout

from .analytic import AnalyticModel
from .decoder import DecoderStep, build_decoder, decoder_step_fn
from .device import (
    CLOCKS,
    calibration_device,
    check_clock,
    cpu_threads,
    device_memory_bytes,
    device_name,
    environment,
    local_hardware,
    synchronizer,
)
from .fit import FitResult, fit_quadratic
from .layout_cost import LayoutCost
from .specs import HardwareSpec, ModelSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "CPU_BUDGET",
    "CUDA_BUDGET",
    "MIN_R2",
    "CalibrationWarning",
    "Measurement",
    "assess",
    "build_decoder",
    "calibrate_layout",
    "calibration_device",
    "calibration_micro_batches",
    "cpu_threads",
    "decoder_step_fn",
    "default_budget",
    "device_memory_bytes",
    "device_name",
    "environment",
    "local_hardware",
    "measure",
]

CPU_BUDGET = 2048
"""Default tokens per calibration micro-batch on the CPU: with ``tiny``, attention overtakes
the matmuls near 1.5K tokens, so the range shows the quadratic term in a few seconds."""
CUDA_BUDGET = 16384
"""Default tokens per calibration micro-batch on a GPU (capped at the token capacity)."""
MIN_R2 = 0.98
"""A calibration fit below this R² is reported as unreliable."""
LAUNCH_BOUND_SHARE = 0.5
"""Launch-bound when the fixed overhead ``c`` is more than this share of the largest micro-batch's time..."""
LAUNCH_BOUND_SPREAD = 1.5
"""... or when times span less than this factor over a 4× (or wider) range of tokens."""
STATISTICS = ("min", "median")
"""How the timed runs of one micro-batch reduce to one number."""

MicroBatch = tuple[int, ...]
"""Sequence lengths (tokens) of one micro-batch."""


class CalibrationWarning(UserWarning):
    """A calibration whose fit should not be trusted (low R², launch-bound timings)."""


def default_budget(device: "torch.device") -> int:
    return CUDA_BUDGET if device.type == "cuda" else CPU_BUDGET


def _as_micro_batch(x: int | Sequence[int]) -> MicroBatch:
    return (int(x),) if isinstance(x, (int, np.integer)) else tuple(int(v) for v in x)


def _label(mb: MicroBatch) -> str:
    if len(set(mb)) == 1:
        return f"{len(mb)}×{mb[0]:,}"
    return f"{len(mb)} seqs, {sum(mb):,} tokens"


def calibration_micro_batches(
    budget: int, pool: Sequence[int] | np.ndarray | None = None, *, seed: int = 0, num_drawn: int = 4
) -> list[tuple[str, MicroBatch]]:
    """``(label, lengths)`` of the micro-batches a calibration times, none over ``budget`` tokens.

    One sequence of ``budget/8, /4, /2, 3/4, 1``; the budget cut into 4, 16, 64 equal
    sequences; 16 sequences of ``budget/64``; ``budget/2`` next to 8 of ``budget/16`` and
    ``budget/4`` next to 48 of ``budget/64``; then ``num_drawn`` micro-batches filled from
    ``pool`` (a length file's lengths, each capped at the budget) in a seeded random order
    until the next sequence would overflow. Sequences shorter than 2 tokens are left out.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 16:
        raise ValueError(f"calibration token budget {budget!r} must be an integer >= 16 tokens (e.g. 2048 or 16384)")
    B = int(budget)
    out: list[tuple[str, MicroBatch]] = []

    def add(label: str, lengths: Sequence[int]) -> None:
        mb = tuple(int(x) for x in lengths)
        if mb and min(mb) >= 2 and sum(mb) <= B and mb not in (m for _, m in out):
            out.append((label, mb))

    for s in (B // 8, B // 4, B // 2, 3 * B // 4, B):  # one sequence: a and b
        add(f"1×{s:,}", [s])
    for k in (4, 16, 64):  # the same tokens in more sequences: d
        add(f"{k}×{B // k:,}", [B // k] * k)
    add(f"16×{B // 64:,}", [B // 64] * 16)  # fewer tokens, many sequences: d apart from Σs
    add(f"{B // 2:,} + 8×{B // 16:,}", [B // 2] + [B // 16] * 8)  # long next to short
    add(f"{B // 4:,} + 48×{B // 64:,}", [B // 4] + [B // 64] * 48)
    if pool is not None:
        lens = np.minimum(np.asarray(pool, dtype=np.int64).ravel(), B)
        lens = lens[lens >= 2]
        if lens.size == 0:
            raise ValueError("calibration: the length file has no sequence of 2 or more tokens to draw from")
        rng = np.random.default_rng(seed)
        for j in range(num_drawn):
            mb: list[int] = []
            for s in lens[rng.permutation(lens.size)[: 4 * B]]:  # enough candidates to fill the budget
                if sum(mb) + int(s) <= B:
                    mb.append(int(s))
                elif sum(mb) > B - 2:
                    break
            add(f"drawn {j + 1}: {len(mb)} seqs", mb)
    return out


class Measurement:
    """Seconds per micro-batch (minimum or median of the runs), and every run."""

    def __init__(self, micro_batches: list[MicroBatch], runs: np.ndarray, statistic: str, clock: str) -> None:
        self.micro_batches = micro_batches
        self.runs = runs
        """float64 seconds, shape (repeats, len(micro_batches))."""
        self.statistic = statistic
        self.clock = clock
        self.seconds = (np.min if statistic == "min" else np.median)(runs, axis=0)
        """float64 seconds per micro-batch, reduced by ``statistic``."""


def measure(
    step_fn: Callable[[MicroBatch], None],
    micro_batches: Sequence[int | Sequence[int]],
    *,
    device: "torch.device",
    warmup: int = 1,
    repeats: int = 5,
    statistic: str = "min",
    clock: str = "wall",
    progress: bool | None = None,
) -> Measurement:
    """Time ``step_fn(micro_batch)`` for every micro-batch (a length or a list of lengths):
    ``warmup`` untimed runs each, then ``repeats`` timed rounds over all of them; the
    ``statistic`` of each one's runs is kept. ``progress=None``: a tqdm bar when stderr is a terminal.
    """
    from tqdm.auto import tqdm

    mbs = [_as_micro_batch(x) for x in micro_batches]
    if not mbs or any(not mb for mb in mbs):
        raise ValueError("calibrate: give at least one non-empty micro-batch")
    short = min(min(mb) for mb in mbs)
    if short < 2:
        raise ValueError(f"calibrate: length {short} is too short; use lengths >= 2 tokens")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"calibrate: warmup={warmup} must be >= 0 and repeats={repeats} >= 1")
    if statistic not in STATISTICS:
        raise ValueError(f"calibrate: statistic={statistic!r} must be one of {list(STATISTICS)}")
    try:
        check_clock(clock, device)
    except ValueError as e:
        raise ValueError(f"calibrate: {e}") from None
    now, sync = CLOCKS[clock], synchronizer(device)
    show = sys.stderr.isatty() if progress is None else progress
    runs = np.empty((repeats, len(mbs)), dtype=np.float64)
    with tqdm(total=len(mbs) * (warmup + repeats), desc="calibrate", unit="run", disable=not show) as bar:
        for mb in mbs:
            for _ in range(warmup):
                step_fn(mb)
                bar.update()
        for r in range(repeats):
            for j, mb in enumerate(mbs):
                sync()
                t0 = now()
                step_fn(mb)
                sync()
                runs[r, j] = now() - t0
                bar.update()
    return Measurement(mbs, runs, statistic, clock)


def assess(
    fit: FitResult, micro_batches: Sequence[MicroBatch], seconds: np.ndarray, label: str = "fit", *,
    launch_bound: bool = True,
) -> list[str]:
    """Why a calibration fit is unreliable (empty list: it is not): R² below :data:`MIN_R2`,
    or (``launch_bound``) launch-bound timings: ``c`` over half of the largest micro-batch's
    time, or times spanning under 1.5× while tokens span 4× or more."""
    problems = []
    if not fit.r2 >= MIN_R2:
        problems.append(
            f"{label}: R² = {fit.r2:.3f} is below {MIN_R2}: the model a·s² + b·s + d + c does not explain the "
            "timings (noisy device, or work that is not the model's); rerun with more --repeats on an idle device"
        )
    if not launch_bound:
        return problems
    tokens = np.array([sum(mb) for mb in micro_batches], dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    share = fit.c / t.max() if t.max() > 0 else 1.0
    spread_t = t.max() / t.min() if t.min() > 0 else math.inf
    spread_s = tokens.max() / tokens.min()
    if share > LAUNCH_BOUND_SHARE or (spread_s >= 4 and spread_t < LAUNCH_BOUND_SPREAD):
        problems.append(
            f"{label}: launch-bound — the fixed overhead c = {fit.c * 1e3:.3g} ms is {share:.0%} of the largest "
            f"micro-batch's {t.max() * 1e3:.3g} ms and times span {spread_t:.2f}× over {spread_s:.0f}× the tokens: "
            "the device waits on kernel launches, not on the model; calibrate a larger model (--layers keeps it "
            "cheap) or a larger token budget"
        )
    return problems


def _fit_dict(fit: FitResult, micro_batches: Sequence[MicroBatch], seconds: np.ndarray) -> dict[str, Any]:
    return {**fit.to_dict(), "predicted": fit.predict(micro_batches).tolist(), "measured": np.asarray(seconds).tolist()}


def _token_capacity(spec: ModelSpec | None, layout: Layout, hardware: HardwareSpec | None, device: Any) -> int:
    """Tokens per micro-batch by the analytic memory model of ``spec`` on ``hardware`` (default: this device)."""
    if spec is None:
        raise ValueError("CostModel.calibrate: with model=None pass token_capacity (tokens per micro-batch)")
    hw = hardware or local_hardware(device)
    capacity = AnalyticModel(spec, hw).analyze(layout).token_capacity
    if capacity < 1:
        raise ValueError(
            f"CostModel.calibrate: {spec.name} does not fit layout {layout.name} on {hw.name} "
            "by the memory model; pass token_capacity or a smaller model"
        )
    return int(capacity)


def _timed_layers(spec: ModelSpec | None, num_layers: int | None, custom_step: bool) -> int | None:
    """The reduced depth to time, or ``None`` to time the model whole."""
    if num_layers is None:
        return None
    if custom_step or spec is None:
        raise ValueError("CostModel.calibrate: num_layers times a reduced copy of the built-in decoder; "
                         "it cannot reduce a custom step_fn")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= spec.num_layers:
        raise ValueError(f"CostModel.calibrate: num_layers={num_layers!r} must be 1..{spec.num_layers} "
                         f"(the layers of {spec.name})")
    return num_layers if num_layers < spec.num_layers else None


def _compositions(
    micro_batches: Sequence[int | Sequence[int]] | None, token_budget: int | None,
    length_pool: Sequence[int] | np.ndarray | None, default: int, seed: int,
) -> tuple[list[tuple[str, MicroBatch]], int]:
    """``(labelled micro-batches, token budget)``: the given ones, or :func:`calibration_micro_batches`."""
    if micro_batches is None:
        budget = token_budget if token_budget is not None else default
        return calibration_micro_batches(budget, length_pool, seed=seed), int(budget)
    if token_budget is not None or length_pool is not None:
        raise ValueError("CostModel.calibrate: give micro_batches, or token_budget / length_pool to compose them")
    given = [_as_micro_batch(x) for x in micro_batches]
    return [(_label(mb), mb) for mb in given], max((sum(mb) for mb in given), default=0)


def calibrate_layout(
    spec: ModelSpec | None,
    *,
    layout: Layout,
    micro_batches: Sequence[int | Sequence[int]] | None = None,
    token_budget: int | None = None,
    length_pool: Sequence[int] | np.ndarray | None = None,
    step_fn: Callable[[MicroBatch], None] | None = None,
    num_layers: int | None = None,
    token_capacity: int | None = None,
    hardware: HardwareSpec | None = None,
    warmup: int = 1,
    repeats: int = 5,
    statistic: str = "min",
    clock: str = "wall",
    num_threads: int | None = None,
    seed: int = 0,
    attention: str = "auto",
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[LayoutCost, dict[str, Any]]:
    """The work of :meth:`CostModel.calibrate`: ``(coefficients, meta)`` of ``layout``.

    ``log(line)`` receives progress lines (the CLI prints them)."""
    import torch

    say = log or (lambda _line: None)
    device = calibration_device()
    custom = step_fn is not None
    if not custom and spec is None:
        raise ValueError("CostModel.calibrate: give a model spec (or preset name) or your own step_fn")
    capacity = int(token_capacity) if token_capacity is not None else _token_capacity(spec, layout, hardware, device)
    timed_layers = _timed_layers(spec, num_layers, custom)
    labelled, budget = _compositions(
        micro_batches, token_budget, length_pool, min(default_budget(device), capacity), seed
    )
    mbs = [mb for _, mb in labelled]
    capacity_from = "given" if token_capacity is not None else f"memory model of {(hardware or local_hardware(device)).name}"
    if token_capacity is None and hardware is None and device.type == "cpu":
        # On a CPU memory bounds nothing useful (the host's RAM would allow micro-batches of
        # millions of tokens, hours each): cap at the largest micro-batch measured here.
        largest = max(sum(mb) for mb in mbs)
        if largest < capacity:
            capacity_from = f"the largest calibrated micro-batch (the CPU's RAM would allow {capacity:,} tokens)"
            capacity = largest

    # time every micro-batch (and at depth 0 when a reduced copy stands for the model)
    with cpu_threads(num_threads):
        env = environment(device)
        if step_fn is None:
            assert spec is not None
            dtype = torch.bfloat16 if device.type == "cuda" and spec.dtype_bytes == 2 else torch.float32
            built = spec if timed_layers is None else replace(spec, num_layers=timed_layers)
            say(f"building {built.name} (depth {built.num_layers}, {built.num_parameters / 1e6:,.1f} M parameters) "
                f"on {env['device']} in {str(dtype).removeprefix('torch.')}")
            step_fn = decoder_step_fn(built, device, dtype, seed, attention)
        kw: dict[str, Any] = dict(
            device=device, warmup=warmup, repeats=repeats, statistic=statistic, clock=clock, progress=progress
        )
        at = f" at depth {timed_layers} of {spec.num_layers}" if timed_layers is not None and spec is not None else ""
        say(f"timing {len(mbs)} micro-batches of up to {budget:,} tokens{at}: {warmup} warm-up + {repeats} runs each")
        seconds = measure(step_fn, mbs, **kw).seconds
        seconds_no_layers = None
        if timed_layers is not None:
            assert isinstance(step_fn, DecoderStep) and spec is not None
            say(f"timing the same micro-batches at depth 0 (embedding, head and loss) to scale to {spec.num_layers} layers")
            whole = step_fn
            seconds_no_layers = measure(lambda mb: whole(mb, depth=0), mbs, **kw).seconds

    # fit what was measured; with a reduced copy, fit again on the times scaled to the full depth
    timed_fit = fit_quadratic(mbs, seconds)
    problems = assess(timed_fit, mbs, seconds, "measured fit")
    meta: dict[str, Any] = {
        "time_unit": "s", **env,
        "model": spec.to_dict() if spec is not None else None,
        "custom_step_fn": custom,
        "token_capacity_from": capacity_from,
        "attention": getattr(step_fn, "attention", "custom"),
        "labels": [lab for lab, _ in labelled],
        "micro_batches": [list(mb) for mb in mbs],
        "seconds": seconds.tolist(),
        "token_budget": budget, "statistic": statistic, "clock": clock, "warmup": warmup, "repeats": repeats,
        "timed_fit": _fit_dict(timed_fit, mbs, seconds),
    }
    fit, fitted_seconds = timed_fit, seconds
    if seconds_no_layers is not None:
        assert spec is not None and timed_layers is not None
        fitted_seconds = seconds_no_layers + spec.num_layers / timed_layers * np.maximum(seconds - seconds_no_layers, 0)
        fit = fit_quadratic(mbs, fitted_seconds)
        problems += assess(fit, mbs, fitted_seconds, "scaled fit", launch_bound=False)
        meta["depth"] = {
            "timed_layers": timed_layers, "model_layers": spec.num_layers,
            "seconds_no_layers": seconds_no_layers.tolist(), "scaled_seconds": fitted_seconds.tolist(),
        }
    meta["fit"] = {layout.name: _fit_dict(fit, mbs, fitted_seconds)}
    meta["reliable"] = not problems
    meta["problems"] = problems
    for p in problems:
        warnings.warn(f"calibration unreliable: {p}", CalibrationWarning, stacklevel=3)
    return LayoutCost(a=fit.a, b=fit.b, c=fit.c, d=fit.d, token_capacity=capacity), meta
