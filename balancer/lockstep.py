"""Lockstep execution: every data-parallel rank runs the same number of micro-batches.

A balanced plan gives ranks different numbers of micro-batches; each rank runs its own
ones back to back and the step takes ``max_r Σ_k T(m_{r,k})`` (the *free* step time the
planner minimises). Engines that synchronise at every micro-batch — FSDP2 resharding
parameters and reduce-scattering gradients after each one — run in *lockstep*: every
rank runs the step's largest count ``K``, padding with one-token micro-batches of zero
loss weight, and each micro-batch ``k`` ends when the slowest rank's ``k``-th does, so
the step takes ``Σ_k max_r T(m_{r,k})`` (a missing ``m_{r,k}`` is the pad). That sum is
smallest when every rank runs its micro-batches longest first (:func:`longest_first`):
for two sorted lists, pairing largest with largest minimises the sum of the pairwise
maxima, and the pads go last.

:func:`lockstep_price` measures that price for a plan under a cost model; the benchmark
``benchmarks/lockstep.py`` runs it over whole simulations. :func:`longest_first` is also
what :meth:`dataloader.StepBatch.lockstep_micro_batches` orders by, so the measured
order is the executed one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from strategies.layout import Layout
from strategies.plan import StepPlan

if TYPE_CHECKING:  # the loader imports longest_first: keep this module light (no cost-model import)
    from .cost import CostModel

__all__ = [
    "LOCKSTEP_ORDERS",
    "LockstepPrice",
    "free_step_seconds",
    "lockstep_price",
    "lockstep_step_seconds",
    "longest_first",
]

LOCKSTEP_ORDERS = ("plan", "tokens", "seconds")
"""How a rank orders its micro-batches in lockstep: as planned, most tokens first, or
longest estimated time first (cost model)."""


def longest_first(keys: Sequence[float]) -> list[int]:
    """Indices of ``keys`` from the largest to the smallest; ties keep their order (stable)."""
    return sorted(range(len(keys)), key=lambda i: -float(keys[i]))


def free_step_seconds(times: Sequence[Sequence[float]]) -> float:
    """``max_r Σ_k T(r, k)``: ranks run their own micro-batches without waiting (seconds)."""
    return max((float(sum(t)) for t in times), default=0.0)


def lockstep_step_seconds(times: Sequence[Sequence[float]], pad_seconds: float) -> float:
    """``Σ_k max_r T(r, k)`` over ``K = max_r len(times[r])`` micro-batches, in the given order;
    a rank with fewer runs pads of ``pad_seconds`` each (seconds)."""
    if pad_seconds < 0:
        raise ValueError(f"pad_seconds={pad_seconds} must be >= 0 seconds")
    count = max((len(t) for t in times), default=0)
    grid = np.full((len(times), count), float(pad_seconds))
    for r, t in enumerate(times):
        grid[r, : len(t)] = np.asarray(t, dtype=np.float64)
    return float(grid.max(axis=0).sum()) if count else 0.0


@dataclass(frozen=True, slots=True)
class LockstepPrice:
    """One plan's step time free and in lockstep (seconds, cost-model estimates)."""

    free: float
    """``max_r Σ_k T(r, k)``: the plan as the planner priced it (no waiting inside the step)."""
    lockstep: dict[str, float]
    """``Σ_k max_r T(r, k)`` per order of :data:`LOCKSTEP_ORDERS`."""
    micro_batches: int
    """``K``: micro-batches every rank runs in lockstep (the step's largest count)."""
    pads: int
    """Pad micro-batches run over all replicas: ``Σ_r (K − K_r)``."""


def lockstep_price(
    plan: StepPlan,
    lengths: np.ndarray | Mapping[int, int],
    cost_model: CostModel,
    *,
    layout: Layout | None = None,
) -> LockstepPrice:
    """The free and lockstep step times of ``plan`` (one pipeline stage: ``pp = 1``).

    ``lengths``: tokens per sample id. ``T(m) = Σ_i (a·s_i² + b·s_i + d) + c`` on each
    replica's layout (or ``layout`` for all); a pad is a one-token micro-batch. Replicas are
    the lockstep units (tensor-parallel peers share their micro-batches).
    """
    times: list[list[float]] = []
    tokens: list[list[int]] = []
    for rep in plan.replicas:
        lay = layout or rep.layout
        if lay.pp != 1:
            raise ValueError(f"lockstep_price: replica {rep.ranks} has pp={lay.pp}; lockstep is priced for pp=1 only")
        cost = cost_model.cost(lay)
        seqs = [[int(lengths[i]) for i in mb] for mb in rep.micro_batches]
        times.append([cost.micro_batch_seconds(s) for s in seqs])
        tokens.append([sum(s) for s in seqs])
    pad = max(cost_model.cost(layout or rep.layout).micro_batch_seconds([1]) for rep in plan.replicas)
    orders = {
        "plan": times,
        "tokens": [[t[i] for i in longest_first(n)] for t, n in zip(times, tokens)],
        "seconds": [[t[i] for i in longest_first(t)] for t in times],
    }
    count = max(len(t) for t in times)
    return LockstepPrice(
        free=free_step_seconds(times),
        lockstep={name: lockstep_step_seconds(t, pad) for name, t in orders.items()},
        micro_batches=count,
        pads=sum(count - len(t) for t in times),
    )
