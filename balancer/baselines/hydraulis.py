"""Hydraulis's own dispatch: randomised-restart greedy placement (the paper's baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from numba import njit

from packers.types import group_by_bin
from strategies.layout import Strategy

from .base import Assignment, BaselinePolicy, _pack_tokens

__all__ = ["HydraulisRandomRestartPolicy", "Placement", "greedy_dispatch", "random_restart_dispatch"]


# ----------------------------------------------------------------------------------------
# Greedy dispatch kernels (stage 1 of hydraulis_random_restart; instance replay)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    """Sequences → replicas: ``bin_of[i]`` is sequence i's replica; loads in seconds."""

    bin_of: np.ndarray
    loads: np.ndarray
    makespan: float
    solver: str


@njit(cache=True)
def _greedy_place(order, times, bin_type, pp_weight, speed):  # pragma: no cover - numba
    # Each sequence in ``order`` goes to the eligible bin whose load after adding it is
    # smallest; load_j = (Σ t + pp_weight_j · max t) / speed_j. Returns bin_of (-1 when a
    # sequence has no eligible bin) and the loads.
    n = times.shape[0]
    m = bin_type.shape[0]
    sums = np.zeros(m)
    maxs = np.zeros(m)
    bin_of = np.full(n, -1, dtype=np.int64)
    for i in order:
        best = np.inf
        bj = -1
        for j in range(m):
            t = times[i, bin_type[j]]
            if not np.isfinite(t):
                continue
            mx = maxs[j] if maxs[j] > t else t
            load = (sums[j] + t + pp_weight[j] * mx) / speed[j]
            if load < best:
                best = load
                bj = j
        if bj < 0:
            return bin_of, np.full(m, np.inf)
        t = times[i, bin_type[bj]]
        sums[bj] += t
        if t > maxs[bj]:
            maxs[bj] = t
        bin_of[i] = bj
    loads = (sums + pp_weight * maxs) / speed
    return bin_of, loads


@njit(cache=True)
def _best_of_orders(orders, times, bin_type, pp_weight, speed):  # pragma: no cover - numba
    # Greedy placement for every row of ``orders``; keeps the smallest makespan (first on ties).
    best_bins = np.full(times.shape[0], -1, dtype=np.int64)
    best_loads = np.full(bin_type.shape[0], np.inf)
    best = np.inf
    for r in range(orders.shape[0]):
        bins, loads = _greedy_place(orders[r], times, bin_type, pp_weight, speed)
        mk = loads.max() if loads.size else 0.0
        if mk < best:
            best = mk
            best_bins = bins
            best_loads = loads
    return best_bins, best_loads


def _dispatch_args(
    times: np.ndarray, bin_type: np.ndarray, pp_weight: np.ndarray | None, speed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    times = np.ascontiguousarray(times, dtype=np.float64)
    bin_type = np.ascontiguousarray(bin_type, dtype=np.int64)
    if times.ndim != 2:
        raise ValueError(f"times must be a 2-D array [sequences, bin types], got shape {times.shape}")
    m = bin_type.size
    if m == 0:
        raise ValueError("bin_type is empty; give at least one replica")
    if bin_type.min() < 0 or bin_type.max() >= times.shape[1]:
        raise ValueError(f"bin_type values must lie in 0..{times.shape[1] - 1}, got {bin_type.min()}..{bin_type.max()}")
    ppw = np.zeros(m) if pp_weight is None else np.ascontiguousarray(pp_weight, dtype=np.float64)
    spd = np.ones(m) if speed is None else np.ascontiguousarray(speed, dtype=np.float64)
    if ppw.shape != (m,) or spd.shape != (m,):
        raise ValueError(f"pp_weight and speed need one value per bin ({m})")
    if np.any(spd <= 0):
        raise ValueError(f"speed must be > 0 for every bin, got min {spd.min()}")
    eligible = np.isfinite(times[:, bin_type]).any(axis=1)
    if not eligible.all():
        i = int(np.flatnonzero(~eligible)[0])
        raise ValueError(f"sequence {i} is eligible for no bin (every time is inf); raise a capacity or drop it")
    return times, bin_type, ppw, spd


def greedy_dispatch(
    times: np.ndarray,
    bin_type: np.ndarray,
    *,
    order: np.ndarray | None = None,
    pp_weight: np.ndarray | None = None,
    speed: np.ndarray | None = None,
) -> Placement:
    """Place sequences one by one on the eligible bin with the smallest resulting load.

    ``times[i, k]`` is sequence i's seconds on a bin of type ``k`` (``inf`` = not
    eligible); ``bin_type[j]`` is bin j's type; load_j = ``(Σ t + pp_weight_j·max t) /
    speed_j``. ``order`` defaults to longest-processing-time first (decreasing fastest
    eligible time): plain heterogeneous LPT.
    """
    times, bin_type, ppw, spd = _dispatch_args(times, bin_type, pp_weight, speed)
    if order is None:
        fastest = np.where(np.isfinite(times[:, bin_type]), times[:, bin_type], np.inf).min(axis=1)
        order = np.argsort(-fastest, kind="stable")
        solver = "lpt"
    else:
        order = np.asarray(order, dtype=np.int64)
        if sorted(order.tolist()) != list(range(times.shape[0])):
            raise ValueError(f"order must be a permutation of 0..{times.shape[0] - 1}")
        solver = "greedy"
    bins, loads = _greedy_place(np.ascontiguousarray(order, dtype=np.int64), times, bin_type, ppw, spd)
    return Placement(bin_of=bins, loads=loads, makespan=float(loads.max()), solver=solver)


def random_restart_dispatch(
    times: np.ndarray,
    bin_type: np.ndarray,
    *,
    restarts: int = 50,
    seed: int | Sequence[int] = 0,
    pp_weight: np.ndarray | None = None,
    speed: np.ndarray | None = None,
) -> Placement:
    """Hydraulis's dispatch: ``restarts`` shuffled orders, each placed by :func:`greedy_dispatch`'s
    rule; the order with the smallest makespan wins (the first one on ties)."""
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be >= 1 (Hydraulis uses 50)")
    times, bin_type, ppw, spd = _dispatch_args(times, bin_type, pp_weight, speed)
    rng = np.random.default_rng(seed)
    orders = rng.permuted(np.tile(np.arange(times.shape[0], dtype=np.int64), (restarts, 1)), axis=1)
    bins, loads = _best_of_orders(orders, times, bin_type, ppw, spd)
    return Placement(bin_of=bins, loads=loads, makespan=float(loads.max()), solver=f"random_restart{restarts}")

class HydraulisRandomRestartPolicy(BaselinePolicy):
    """Hydraulis's dispatch: the best of ``restarts`` shuffled greedy placements.

    Stage 1 loads follow the Hydraulis instance formula ``Σ t + (pp−1)·max t`` over the
    replicas of the fixed strategy (divided by replica speed); stage 2 packs each
    replica's sequences first-fit-decreasing by tokens into micro-batches (>= pp of them).
    """

    name = "hydraulis_random_restart"
    system = "Hydraulis (arXiv 2412.07894): randomised-restart dispatch"
    fidelity = "from the paper; no peer fixture"

    def __init__(self, *args: Any, restarts: int = 50, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if restarts < 1:
            raise ValueError(f"restarts={restarts} must be >= 1 (Hydraulis uses 50)")
        self.restarts = int(restarts)
        layouts = sorted(set(self.strategy.layouts))
        self._layouts = layouts
        self._bin_type = np.array([layouts.index(r.layout) for r in self.strategy.replicas], dtype=np.int64)
        self._pp_weight = np.array([r.layout.pp - 1 for r in self.strategy.replicas], dtype=np.float64)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        times = np.empty((lengths.size, len(self._layouts)))
        for k, lay in enumerate(self._layouts):
            cost = self.cost_model.cost(lay)
            times[:, k] = np.where(lengths <= cost.token_capacity, cost.seconds(lengths), np.inf)
        seed = int(rng.integers(2**31))
        got = random_restart_dispatch(
            times, self._bin_type, restarts=self.restarts, seed=seed,
            pp_weight=self._pp_weight, speed=np.array(self._speeds),
        )
        per_replica = group_by_bin(got.bin_of, len(self.strategy.replicas))
        out = [
            _pack_tokens(pos, lengths, self.cost_model.token_capacity(rep.layout), rep.layout.pp)
            for rep, pos in zip(self.strategy.replicas, per_replica)
        ]
        return self.strategy, out
