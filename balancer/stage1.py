"""Stage 1: dispatch one step's sequences to the replicas of one strategy.

The problem is makespan scheduling on *unrelated machines*: sequence ``i`` costs
``t_k(s_i) = a_k·s_i² + b_k·s_i + d_k`` seconds on a replica of layout ``k`` (``d_k`` the
per-sequence overhead, folded into every item's time so that no kernel needs a term of
its own), may go only to a
replica whose layout holds it (``s_i ≤ token_capacity_k``), and replica ``j`` runs at
relative speed ``speed_j`` (its slowest rank). Replicas with the same layout form one
*type*: the time matrix has one column per type, not per replica, so a 1,024-replica
strategy with two layouts prices each sequence twice, not 1,024 times.

Stage 1 cannot see stage 2's micro-batches, so the times it balances anticipate them:

* every micro-batch holds at most ``capacity`` tokens, so a replica given ``Σ s`` tokens
  runs at least ``Σ s / capacity`` micro-batches of overhead ``c`` each. Each sequence
  therefore carries ``c·s_i / capacity_k`` on top of ``t_k(s_i)``;
* a pipeline (``pp > 1``) pays ``(pp−1)·max_k T(m_k)`` for its bubble; stage 1 charges
  ``pp−1`` times the replica's largest item (``pp_weight``).

The fast path is :func:`packers.lpt_makespan` (heterogeneous LPT + local search, numba);
:func:`refine_dispatch` hands the greedy answer as a hint to :func:`packers.cpsat_makespan`.

The lower bounds every plan reports (``estimate / bound``) are in :mod:`balancer.bounds`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numba import njit

import packers
from packers._lp import type_lp
from packers._state import build_instance
from packers.makespan import solve_instance
from packers.validate import UNLIMITED_TOKENS
from strategies.layout import Layout, Strategy

from .cost import CostModel

__all__ = [
    "ReplicaTable",
    "Dispatch",
    "Stage1LP",
    "item_seconds",
    "stage1_times",
    "stage1_arrays",
    "stage1_lp",
    "dispatch",
    "refine_dispatch",
]


@dataclass(frozen=True, eq=False)
class ReplicaTable:
    """Per-strategy arrays that stages 1 and 2 need, built once per (strategy, speeds).

    ``K`` = distinct layouts (replica *types*, first-appearance order), ``m`` = replicas.
    Speeds vary per replica (a straggler slows only its own replica), so they are kept per
    replica rather than splitting a type per speed value.
    """

    strategy: Strategy
    layouts: tuple[Layout, ...]
    """The ``K`` replica types."""
    a: np.ndarray
    """float64[K], seconds per token² (attention)."""
    b: np.ndarray
    """float64[K], seconds per token."""
    c: np.ndarray
    """float64[K], seconds per micro-batch."""
    d: np.ndarray
    """float64[K], seconds per sequence (part of every item time :func:`item_seconds` gives)."""
    capacity: np.ndarray
    """int64[K], most tokens per micro-batch."""
    pp: np.ndarray
    """int64[K], pipeline degree."""
    bin_type: np.ndarray
    """int64[m], type of each replica (strategy order)."""
    speed: np.ndarray
    """float64[m], relative speed of each replica (its slowest rank)."""

    @classmethod
    def build(cls, strategy: Strategy, cost_model: CostModel, rank_speed: Sequence[float] | np.ndarray | None = None) -> "ReplicaTable":
        """Resolve the strategy's layouts in ``cost_model``; ``rank_speed`` is per rank (default 1.0)."""
        layouts: list[Layout] = []
        bin_type = np.empty(len(strategy.replicas), dtype=np.int64)
        for j, rep in enumerate(strategy.replicas):
            if rep.layout not in layouts:
                layouts.append(rep.layout)
            bin_type[j] = layouts.index(rep.layout)
        costs = [cost_model.cost(lay) for lay in layouts]
        if rank_speed is None:
            speed = np.ones(len(strategy.replicas), dtype=np.float64)
        else:
            rs = np.asarray(rank_speed, dtype=np.float64)
            if rs.shape != (strategy.num_ranks,):
                raise ValueError(
                    f"strategy {strategy.name!r} has {strategy.num_ranks} ranks but {rs.size} speeds were given; "
                    "give one relative speed per rank"
                )
            ranks = np.fromiter((r for rep in strategy.replicas for r in rep.ranks), dtype=np.int64)
            starts = np.cumsum([0] + [len(rep.ranks) for rep in strategy.replicas[:-1]])
            speed = np.minimum.reduceat(rs[ranks], starts)
        return cls(
            strategy=strategy,
            layouts=tuple(layouts),
            a=np.array([x.a for x in costs], dtype=np.float64),
            b=np.array([x.b for x in costs], dtype=np.float64),
            c=np.array([x.c for x in costs], dtype=np.float64),
            d=np.array([x.d for x in costs], dtype=np.float64),
            capacity=np.array([x.token_capacity for x in costs], dtype=np.int64),
            pp=np.array([lay.pp for lay in layouts], dtype=np.int64),
            bin_type=bin_type,
            speed=speed,
        )

    @property
    def num_replicas(self) -> int:
        return int(self.bin_type.size)

    @property
    def max_capacity(self) -> int:
        """Longest sequence (tokens) some replica of this strategy holds."""
        return int(self.capacity.max())

    @property
    def pp_weight(self) -> np.ndarray:
        """float64[m]: ``pp − 1`` per replica, the weight of its largest item in stage 1."""
        return (self.pp[self.bin_type] - 1).astype(np.float64)


@dataclass(frozen=True, eq=False)
class Dispatch:
    """Stage-1 answer: the replica of every sequence."""

    bin_of: np.ndarray
    """int64[n], replica index (strategy order) of each sequence."""
    stage1_makespan: float
    """Makespan of the anticipated stage-1 objective, seconds (not the final estimate)."""
    solver: str
    status: str = "heuristic"
    """``"heuristic"`` for the greedy; CP-SAT's status name (``OPTIMAL``, ``FEASIBLE``, ...) otherwise."""


def item_seconds(table: ReplicaTable, lengths: np.ndarray) -> np.ndarray:
    """float64[n, K]: ``a_k·s² + b_k·s + d_k`` of every sequence on every replica type."""
    s = lengths.astype(np.float64)[:, None]
    return table.a[None, :] * s * s + table.b[None, :] * s + table.d[None, :]


def stage1_times(table: ReplicaTable, lengths: np.ndarray, t: np.ndarray | None = None) -> np.ndarray:
    """float64[n, K]: anticipated stage-1 seconds ``t_k(s) + c_k·s/capacity_k``; ``inf`` = not eligible."""
    if t is None:
        t = item_seconds(table, lengths)
    s = lengths.astype(np.float64)[:, None]
    w = t + table.c[None, :] * s / table.capacity[None, :].astype(np.float64)
    w[lengths[:, None] > table.capacity[None, :]] = np.inf
    return w


@njit(cache=True, nogil=True)
def _stage1_kernel(lengths, a, b, c, d, capacity):
    n = lengths.shape[0]
    num_types = a.shape[0]
    t = np.empty((n, num_types))
    w = np.empty((n, num_types))
    for i in range(n):
        s = float(lengths[i])
        for k in range(num_types):
            x = a[k] * s * s + b[k] * s + d[k]  # same operations, in the same order, as item_seconds
            t[i, k] = x
            w[i, k] = np.inf if lengths[i] > capacity[k] else x + c[k] * s / float(capacity[k])
    return t, w


def stage1_arrays(table: ReplicaTable, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(item_seconds, stage1_times)`` of int64 ``lengths`` in one pass (numba): the same
    float64[n, K] arrays as :func:`item_seconds` and :func:`stage1_times`, bit for bit."""
    return _stage1_kernel(
        np.ascontiguousarray(lengths, dtype=np.int64), table.a, table.b, table.c, table.d, table.capacity
    )


@dataclass(frozen=True, eq=False)
class Stage1LP:
    """The LP by replica type on the anticipated stage-1 times ``w`` (:func:`stage1_lp`)."""

    value: float
    """LP optimum, seconds (the best dual value found: valid even if not converged). Below
    the step time of every plan of the strategy (:func:`lower_bound`, bound 4), up to
    floating-point slack (users scale it by ``1 − 1e-9``)."""
    x: np.ndarray | None
    """float64[n, K] fractional type split (``None`` for a one-type strategy); guides the greedy."""


def stage1_lp(table: ReplicaTable, w: np.ndarray, counts: np.ndarray | None = None) -> Stage1LP:
    """Solve the LP by type on ``w`` (:func:`packers._lp.type_lp`, numba cutting planes).

    ``counts``: when given, row ``i`` of ``w`` stands for ``counts[i]`` sequences of one
    length (``w`` of the distinct lengths): the same LP with fewer rows; ``x`` is then per
    row. With one replica type the LP is the volume ``Σ_i w_i / Σ_j speed_j`` and ``x`` is
    ``None``.
    """
    if table.capacity.size == 1:
        col = w[:, 0] if counts is None else w[:, 0] * counts
        return Stage1LP(value=float(col.sum() / table.speed.sum()), x=None)
    weights = None if counts is None else np.asarray(counts, dtype=np.float64)
    value, x, _ = type_lp(np.ascontiguousarray(w), table.bin_type, table.speed, weights=weights)
    return Stage1LP(value=float(value), x=x)


def _check_eligible(table: ReplicaTable, lengths: np.ndarray) -> None:
    if lengths.size and int(lengths.max()) > table.max_capacity:
        i = int(np.argmax(lengths))
        raise ValueError(
            f"sequence at batch position {i} has {int(lengths[i])} tokens, above the largest capacity "
            f"{table.max_capacity} of strategy {table.strategy.name!r}; choose a strategy that holds it"
        )


def dispatch(
    table: ReplicaTable,
    lengths: np.ndarray,
    w: np.ndarray | None = None,
    *,
    local_search: bool = True,
    max_rounds: int | None = None,
    lp: Stage1LP | None = None,
) -> Dispatch:
    """Greedy stage 1 (heterogeneous LPT + local search) on anticipated times ``w``.

    Every replica gets at least one sequence when there are at least as many sequences as
    replicas (and eligibility allows it). ``lp``: :func:`stage1_lp` of this ``w`` when
    already solved (the greedy's type split reuses it instead of solving it again).
    ``w`` from :func:`stage1_times` / :func:`stage1_arrays` is valid by construction, so
    the packer's input checks are skipped.
    """
    _check_eligible(table, lengths)
    if w is None:
        w = stage1_times(table, lengths)
    n, m = lengths.size, table.num_replicas
    inst = build_instance(
        np.ascontiguousarray(w, dtype=np.float64),
        table.bin_type,
        table.speed,
        table.pp_weight,
        np.zeros(n, dtype=np.int64),
        np.full(m, UNLIMITED_TOKENS, dtype=np.int64),
    )
    res = solve_instance(
        inst,
        require_nonempty=n >= m,
        local_search=local_search,
        max_rounds=max_rounds,
        lp=None if lp is None or lp.x is None else (lp.value, lp.x),
    )
    return Dispatch(bin_of=np.asarray(res.bin_of, dtype=np.int64), stage1_makespan=float(res.makespan), solver="greedy")


def refine_dispatch(
    table: ReplicaTable,
    lengths: np.ndarray,
    w: np.ndarray,
    hint: Dispatch,
    *,
    time_limit: float,
    seed: int,
    num_workers: int = 1,
    deterministic_time: float | None = None,
) -> Dispatch:
    """CP-SAT on the same stage-1 objective, warm-started with ``hint``; never worse than the hint.

    ``time_limit`` is wall seconds; ``deterministic_time`` (CP-SAT deterministic units)
    replaces it for a clock-independent, reproducible answer (one worker)."""
    res = packers.cpsat_makespan(
        w,
        table.bin_type,
        speed=table.speed,
        pp_weight=table.pp_weight,
        require_nonempty=lengths.size >= table.num_replicas,
        hint=hint.bin_of,
        time_limit=time_limit,
        seed=seed,
        num_workers=num_workers,
        deterministic_time=deterministic_time,
    )
    return Dispatch(
        bin_of=np.asarray(res.bin_of, dtype=np.int64),
        stage1_makespan=float(res.makespan),
        solver=str(res.solver),
        status=str(res.status),
    )
