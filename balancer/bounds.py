"""Lower bounds on the step time of any two-stage plan of a strategy.

:func:`lower_bound` is valid against the exact replica time ``Σ T + v·c + (pp−1)·max T``
with ``T(m) = Σ_{i∈m} t(s_i)``, ``t(s) = a·s² + b·s + d`` (its docstring proves each of its
six parts), so every plan can report ``estimate / bound``. The per-sequence overhead ``d``
needs no bound of its own: every sequence pays it wherever it runs, so it is part of the
item time ``t`` that every proof below is written in. :func:`quick_lower_bound` is the cheap subset the selector uses to
skip strategies that cannot beat the best estimate found.
"""

from __future__ import annotations

import numpy as np
from numba import njit

import packers
from packers._lp import type_lp
from packers.bounds import combined_makespan_bound

from .stage1 import ReplicaTable, Stage1LP, item_seconds, stage1_arrays, stage1_lp, stage1_times

__all__ = ["lower_bound", "quick_lower_bound"]

_LP_SAFETY = 1.0 - 1e-9
"""An LP value is scaled by this before it is used as a bound (floating-point slack)."""


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
    ``T(m) = Σ_{i∈m} t(s_i)``, ``t(s) = a·s² + b·s + d`` with ``a, b, c, d ≥ 0`` (``t`` is
    :func:`~balancer.stage1.item_seconds`: the per-sequence ``d`` is inside every item time,
    so each argument below holds with it as it holds without), ``v ≥ pp`` micro-batches on
    a non-idle replica and ``v ≥ Σ s / capacity``:

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
         ``S ≤ v·capacity`` and ``W ≥ b·S`` (``t ≥ b·s`` as ``a, d ≥ 0``). Within
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
