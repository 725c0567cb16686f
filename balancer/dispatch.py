"""Stage 1: dispatch one step's sequences to the replicas of one strategy.

The problem is makespan scheduling on *unrelated machines*: sequence ``i`` costs
``t_k(s_i) = a_k·s_i² + b_k·s_i`` seconds on a replica of layout ``k``, may go only to a
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

:func:`lower_bound` gives a bound on the step time of *any* two-stage plan for the
strategy, valid against the exact replica time ``Σ T + v·c + (pp−1)·max T`` (see its
docstring), so every plan can report ``estimate / bound``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from numba import njit

import packers
from packers._lp import type_lp
from packers._state import build_instance
from packers.bounds import combined_makespan_bound
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
    "quick_lower_bound",
    "dispatch",
    "refine_dispatch",
    "lower_bound",
]

_LP_SAFETY = 1.0 - 1e-9
"""An LP value is scaled by this before it is used as a bound (floating-point slack)."""


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
    """float64[n, K]: ``a_k·s² + b_k·s`` of every sequence on every replica type."""
    s = lengths.astype(np.float64)[:, None]
    return table.a[None, :] * s * s + table.b[None, :] * s


def stage1_times(table: ReplicaTable, lengths: np.ndarray, t: np.ndarray | None = None) -> np.ndarray:
    """float64[n, K]: anticipated stage-1 seconds ``t_k(s) + c_k·s/capacity_k``; ``inf`` = not eligible."""
    if t is None:
        t = item_seconds(table, lengths)
    s = lengths.astype(np.float64)[:, None]
    w = t + table.c[None, :] * s / table.capacity[None, :].astype(np.float64)
    w[lengths[:, None] > table.capacity[None, :]] = np.inf
    return w


@njit(cache=True, nogil=True)
def _stage1_kernel(lengths, a, b, c, capacity):
    n = lengths.shape[0]
    num_types = a.shape[0]
    t = np.empty((n, num_types))
    w = np.empty((n, num_types))
    for i in range(n):
        s = float(lengths[i])
        for k in range(num_types):
            x = a[k] * s * s + b[k] * s  # same operations, in the same order, as item_seconds
            t[i, k] = x
            w[i, k] = np.inf if lengths[i] > capacity[k] else x + c[k] * s / float(capacity[k])
    return t, w


def stage1_arrays(table: ReplicaTable, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(item_seconds, stage1_times)`` of int64 ``lengths`` in one pass (numba): the same
    float64[n, K] arrays as :func:`item_seconds` and :func:`stage1_times`, bit for bit."""
    return _stage1_kernel(np.ascontiguousarray(lengths, dtype=np.int64), table.a, table.b, table.c, table.capacity)


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


def quick_lower_bound(
    table: ReplicaTable, lengths: np.ndarray, t: np.ndarray, lp: Stage1LP, counts: np.ndarray | None = None
) -> float:
    """Bounds 1, 4 (its LP) and 5 of :func:`lower_bound`, scaled down by ``1 − 1e-9``
    (floating-point slack): cheap once ``lp`` is solved, and valid for every plan of the
    strategy, so the selector can skip a strategy whose bound already exceeds the best
    estimate found. ``counts``: multiplicity of each row (``lengths`` distinct)."""
    work = float(t[:, 0].sum() if counts is None else (t[:, 0] * counts).sum())
    bound = max(_single_item_bound(table, lengths, t), lp.value, _pipeline_volume_bound(table, work))
    return bound * _LP_SAFETY


def _pipeline_volume_bound(table: ReplicaTable, work: float) -> float:
    """Bound 5 of :func:`lower_bound` (one layout, ``pp > 1``; else 0): the largest
    makespan ``M`` found infeasible by bisection, ``work`` = ``Σ_i t(s_i)`` seconds."""
    if table.capacity.size != 1 or int(table.pp[0]) < 2 or work <= 0.0:
        return 0.0
    a = float((table.pp[0] - 1) * table.c[0])
    root_a = np.sqrt(a)
    speed = table.speed
    lo = 0.0
    hi = (work + 2.0 * np.sqrt(a * work)) / float(speed.min())  # feasible: one replica does it all
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float(((np.sqrt(mid * speed + a) - root_a) ** 2).sum()) < work:
            lo = mid  # the replicas cannot absorb the work within mid
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _single_item_kernel(lengths, t, pp, c, capacity, fastest):
    """``max_i min_{k holds i} pp_k·(t[i, k] + c_k) / fastest_k`` (bound 1 of :func:`lower_bound`)."""
    out = 0.0
    for i in range(lengths.shape[0]):
        best = np.inf
        for k in range(pp.shape[0]):
            if lengths[i] <= capacity[k]:
                v = pp[k] * (t[i, k] + c[k]) / fastest[k]
                if v < best:
                    best = v
        if best > out:
            out = best
    return out


def _single_item_bound(table: ReplicaTable, lengths: np.ndarray, t: np.ndarray) -> float:
    fastest = np.zeros(table.capacity.size, dtype=np.float64)
    np.maximum.at(fastest, table.bin_type, table.speed)
    return float(
        _single_item_kernel(
            np.ascontiguousarray(lengths, dtype=np.int64), np.ascontiguousarray(t, dtype=np.float64),
            table.pp.astype(np.float64), table.c, table.capacity, fastest,
        )
    )


_CERTIFY_MARGIN = 1e-9
"""A makespan guess counts as infeasible only when the LP value exceeds ``1 + 1e-9``."""
_DUAL_APPROX_SOLVES = (8, 6)
"""LP solves of each pass of :func:`_dual_approximation_bound` (pass 2: token-weighted)."""
_TOKEN_THETA = 3.0
"""Pass 2 weighs tokens by ``α = c/capacity + 3·b`` seconds per token (every type with ``b, c > 0``)."""


@njit(cache=True, nogil=True)
def _gamma(y, c, cap, b, p, al):
    """``f(v) = α·min(v·cap, W_v/b) + W_v``, ``W_v = (y − v·c)·v/(v + p)``, maximised over
    integers ``p + 1 ≤ v ≤ y/c`` by binary search on ``f(v+1) − f(v)`` (``f`` is concave), or
    0; ``c = 0``: the supremum ``y + α·y/b`` (``inf`` if ``b = 0``)."""
    if c <= 0.0:
        return y + al * y / b if b > 0.0 else np.inf
    lo = p + 1.0
    hi = np.floor(y / c)
    if hi < lo:
        return 0.0
    while lo < hi:
        mid = np.floor(0.5 * (lo + hi))
        w0 = (y - mid * c) * mid / (mid + p)
        w1 = (y - (mid + 1.0) * c) * (mid + 1.0) / (mid + 1.0 + p)
        f0 = al * (min(mid * cap, w0 / b) if b > 0.0 else mid * cap) + w0
        f1 = al * (min((mid + 1.0) * cap, w1 / b) if b > 0.0 else (mid + 1.0) * cap) + w1
        if f1 <= f0:
            hi = mid
        else:
            lo = mid + 1.0
    w = (y - lo * c) * lo / (lo + p)
    f = al * (min(lo * cap, w / b) if b > 0.0 else lo * cap) + w
    return max(f, 0.0)


@njit(cache=True, nogil=True)
def _capacity_kernel(y, bin_type, c, cap, b, pp, alpha):
    out = np.empty(y.shape[0])
    for j in range(y.shape[0]):
        k = bin_type[j]
        out[j] = _gamma(y[j], c[k], float(cap[k]), b[k], float(pp[k] - 1), alpha[k])
    return out


def _replica_capacity(table: ReplicaTable, y: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """float64[m]: ``γ_j``, the most ``Σ_{i on j} (t_i + α_k·s_i)`` replica ``j`` can hold
    within ``y_j = M·speed_j`` seconds of its own time (bound 6 of :func:`lower_bound`):
    ``max(0, max_{pp ≤ v ≤ y/c} f(v))``, ``f(v) = α·min(v·capacity, W_v/b) + W_v``,
    ``W_v = (y − v·c)·v/(v + pp − 1)``. ``f`` is concave in ``v`` (``W_v`` is, and so is
    the min of a linear and a concave function), so a binary search on ``f(v+1) − f(v)``
    finds the integer maximum (numba). ``c = 0``: the supremum ``y + α·y/b`` (``inf`` if
    ``b = 0``)."""
    return _capacity_kernel(
        np.ascontiguousarray(y, dtype=np.float64), table.bin_type, table.c, table.capacity, table.b, table.pp,
        np.ascontiguousarray(alpha, dtype=np.float64),
    )


def _lp_value_at(
    table: ReplicaTable, s: np.ndarray, counts: np.ndarray, t: np.ndarray, single: np.ndarray, alpha: np.ndarray, m: float
) -> float:
    """Value of the LP of bound 6 at makespan ``m``: above 1 proves no plan finishes within ``m``."""
    eligible = (s[:, None] <= table.capacity[None, :]) & (single <= m)
    if not eligible.any(axis=1).all():
        return np.inf  # some sequence fits no type within m
    u = np.where(eligible, t + alpha[None, :] * s[:, None].astype(np.float64), np.inf)
    capacity = _replica_capacity(table, m * table.speed, alpha)
    type_capacity = np.bincount(table.bin_type, weights=capacity, minlength=table.capacity.size)
    dead = type_capacity <= 0.0  # a type that can take no work within m: its sequences go elsewhere
    if dead.any():
        u[:, dead] = np.inf
        if not np.isfinite(u).any(axis=1).all():
            return np.inf
        keep = ~dead[table.bin_type]
        value, _, _ = type_lp(np.ascontiguousarray(u), table.bin_type[keep], capacity[keep], weights=counts)
        return float(value)
    value, _, _ = type_lp(np.ascontiguousarray(u), table.bin_type, capacity, weights=counts)
    return float(value)


def _dual_approximation_bound(table: ReplicaTable, lengths: np.ndarray, known: float) -> float:
    """Bound 6 of :func:`lower_bound`: the largest makespan proven infeasible, or ``known``.

    Two passes of at most :data:`_DUAL_APPROX_SOLVES` LP solves each (deterministic, no
    clock): the first with ``α_k = c_k/capacity_k``, the second (when some type has
    ``b, c > 0``) with ``α_k = c_k/capacity_k + 3·b_k``. Each pass starts at the best
    proven value, jumps to ``M·L(M)`` while that stays proven, then bisects.
    """
    if lengths.size == 0 or known <= 0.0:
        return known
    s, counts = np.unique(lengths, return_counts=True)
    t, _ = stage1_arrays(table, s)
    fastest = np.zeros(table.capacity.size, dtype=np.float64)
    np.maximum.at(fastest, table.bin_type, table.speed)
    with np.errstate(divide="ignore"):
        single = table.pp[None, :].astype(np.float64) * (t + table.c[None, :]) / fastest[None, :]
    weights = counts.astype(np.float64)
    base = table.c / table.capacity.astype(np.float64)
    alphas = [base]
    if np.any((table.b > 0.0) & (table.c > 0.0)):
        alphas.append(base + _TOKEN_THETA * table.b)
    lo = known
    for alpha, solves in zip(alphas, _DUAL_APPROX_SOLVES):
        hi = np.inf
        m = lo
        for _ in range(solves):
            value = _lp_value_at(table, s, weights, t, single, alpha, m)
            if value > 1.0 + _CERTIFY_MARGIN:
                lo = m
                m = m * min(value, 2.0) if not np.isfinite(hi) else 0.5 * (lo + hi)
            else:
                if m == lo:
                    break  # this pass cannot prove anything above lo
                hi = m
                m = 0.5 * (lo + hi)
    return lo


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


def lower_bound(
    table: ReplicaTable,
    lengths: np.ndarray,
    t: np.ndarray | None = None,
    *,
    w: np.ndarray | None = None,
    lp: Stage1LP | None = None,
) -> float:
    """Seconds no two-stage plan of this strategy can beat; ``max`` of six valid bounds.

    With ``T_j`` the exact replica time ``(Σ_k T(m_k) + v·c + (pp−1)·max_k T(m_k)) / speed``,
    ``v ≥ pp`` micro-batches on a non-idle replica and ``v ≥ Σ s / capacity``:

    1. *one item*: the replica holding ``i`` takes ``≥ pp·(t(s_i) + c) / speed``
       (``Σ T ≥ t_i``, ``max T ≥ t_i``, ``v ≥ pp``); minimised over the types that hold ``i``
       at the fastest speed of that type.
    2. *area*: ``Σ_j speed_j·T_j ≥ Σ_i min_k (t_k(s_i) + c_k·s_i/capacity_k)``, so the
       makespan is at least that sum over ``Σ_j speed_j``.
    3. :func:`packers.makespan_lower_bound` on the pure times ``t`` with ``pp_weight = pp−1``,
       an objective the exact replica time never falls below (computed only when some
       layout has ``pp > 1``: with ``pp = 1`` everywhere it has no pipeline term, and
       bound 4 evaluates the same terms on the larger times ``w ≥ t``).
    4. *stage-1 relaxation*: every replica satisfies ``speed_j·T_j ≥ Σ_{i∈j} w(s_i)``
       (``v ≥ Σ s / capacity``), so the makespan of assigning the anticipated times ``w``
       with no pipeline term bounds the step time from below, and so does every lower
       bound of that problem: its LP by type (:func:`stage1_lp`), its single-item and
       volume bounds, and its eligibility pigeonhole
       (:func:`packers.bounds.combined_makespan_bound`). ``w`` and ``lp`` are computed
       when not given; ``lp`` may be :func:`stage1_lp` of the distinct lengths with
       their counts (the same LP: only its value is used here).
    5. *pipeline volume* (one layout with ``pp > 1``): a replica given work
       ``W_j = Σ t`` runs ``v`` micro-batches with ``max T ≥ W_j / v``, so
       ``speed_j·T_j ≥ W_j + v·c + (pp−1)·W_j/v ≥ W_j + 2·sqrt((pp−1)·c·W_j)`` (the minimum
       over real ``v > 0``). Inverting, ``W_j ≤ (sqrt(M·speed_j + a) − sqrt(a))²`` with
       ``a = (pp−1)·c``; the step time ``M`` must let the replicas absorb ``Σ_j W_j = Σ_i
       t(s_i)``, and bisection finds the largest ``M`` that cannot. The LP ignores the
       bubble, so on all-pipeline strategies this is the tight bound.
    6. *dual approximation* (:func:`_dual_approximation_bound`): a makespan ``M`` is
       infeasible when the LP below has value above 1; the largest ``M`` proven so (by a
       fixed number of LP solves) is a bound. Suppose a plan finishes within ``M``. Then

       * item ``i`` sits on a type ``k`` with ``pp_k·(t_k(s_i) + c_k)/fastest_k ≤ M``
         (bound 1's argument), so the LP may drop every other pair ``(i, k)`` — this is
         what sees that a 32K-token sequence on a cp2 replica alone exceeds ``M``, which
         the plain LP (spreading it over 58 cp2 replicas) does not;
       * a replica with ``S`` tokens, work ``W = Σ t``, ``v`` micro-batches has
         ``speed·T ≥ W + v·c + (pp−1)·W/v`` (``max T ≥ W/v``), ``v ≥ pp`` when not idle,
         ``S ≤ v·capacity`` and ``W ≥ b·S`` (``t ≥ b·s`` as ``a ≥ 0``). Within
         ``y = M·speed`` that leaves ``W ≤ W_v = (y − v·c)·v/(v + pp − 1)``, so for every
         ``α ≥ 0``: ``α·S + W ≤ γ(y) = max(0, max_{pp ≤ v ≤ y/c} α·min(v·capacity,
         W_v/b) + W_v)`` (:func:`_replica_capacity`). With ``α = c/capacity``
         (``t + α·s`` is the stage-1 time ``w``) and ``pp = 1``, ``γ ≤ y``; ``γ`` is
         smaller when whole micro-batches bite (each replica pays at least one ``c``,
         counts are integers) and, for ``pp > 1``, by the bubble ``(pp−1)·W/v``, which
         bound 4 ignores on mixed strategies;

       So the plan's type split ``x`` satisfies ``Σ_i x_ik·(t_ik + α_k·s_i) ≤ Σ_{j of type k}
       γ_j(M)``: the LP by type (:func:`packers._lp.type_lp`) on these times and capacities
       has value ≤ 1, and so has its dual value (weak duality). A dual value
       above ``1 + 1e-9`` therefore proves ``OPT > M``; which ``M`` are tried only decides
       how tight the result is. Two passes: ``α = c/capacity`` and
       ``α = c/capacity + 3·b`` (tokens weighed more: the integrality of micro-batch
       counts bites on token-bound replicas). Scaled by ``1 − 1e-9``. Computed on the distinct lengths (with counts).
    """
    if lengths.size == 0:
        return 0.0
    if t is None:
        t = item_seconds(table, lengths)
    if w is None:
        w = stage1_times(table, lengths, t)
    if lp is None:
        lp = stage1_lp(table, w)
    eligible = lengths[:, None] <= table.capacity[None, :]
    bound_single = _single_item_bound(table, lengths, t)
    per_token = np.where(eligible, w, np.inf)
    bound_area = float(per_token.min(axis=1).sum() / table.speed.sum())
    bound_packers = 0.0
    if int(table.pp.max()) > 1:
        t_eligible = np.where(eligible, t, np.inf)
        bound_packers = float(
            packers.makespan_lower_bound(t_eligible, table.bin_type, speed=table.speed, pp_weight=table.pp_weight)
        )
    bound_stage1 = float(
        combined_makespan_bound(
            np.ascontiguousarray(w), table.bin_type, table.speed, np.zeros(table.num_replicas), lp.value
        )
    )
    bound_pipeline = _pipeline_volume_bound(table, float(t[:, 0].sum())) * _LP_SAFETY
    known = max(bound_single, bound_area, bound_packers, bound_stage1, bound_pipeline)
    return max(known, _dual_approximation_bound(table, lengths, known) * _LP_SAFETY)
