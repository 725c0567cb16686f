"""Lower bounds: every packer's quality is reported as ``result / bound``.

All bounds are valid: never above the optimum of the instance they are given.

**Makespan** (:func:`makespan_lower_bound`, unrelated machines in bin types; capacities
and ``require_nonempty`` only restrict the problem further, so the bound stays valid):

* single item: ``max_i min_j times[i, k_j] · (1 + w_j) / v_j`` — an item's bin carries
  at least that item, counted once more by the pipeline term;
* volume: ``Σ_i min_k times[i, k] / Σ_j v_j`` — ``Σ_j v_j·load_j`` is at least the total
  work, each item at its cheapest type;
* eligibility pigeonhole: items whose eligible types all lie in a set E can use only
  the ``m_E`` bins of those types; among the ``ℓ·m_E + 1`` largest of them (each at its
  cheapest type in E and that type's fastest bin) some bin gets ``ℓ+1``, so ``T`` is at
  least the sum of the ``ℓ+1`` smallest of those (every ℓ and every E that occurs);
* LP by type: with ``V_k = Σ_{j of type k} v_j`` and ``c_ik = times[i, k] / V_k``,

      min T  s.t.  Σ_k x_ik = 1,  Σ_i c_ik x_ik <= T  (every type k),  x >= 0,
                   x_ik = 0 where times[i, k] = inf

  (summing ``S_j <= T·v_j`` over the bins of type k). Its dual is
  ``max_{μ in simplex} g(μ)``, ``g(μ) = Σ_i min_k μ_k c_ik``: concave, and *every* μ
  gives a valid bound ``g(μ)`` (weak duality). We maximise g by Kelley's cutting
  planes: ``g(μ) <= s·μ`` for the supergradient ``s_k = Σ_{i: argmin = k} c_ik`` at any
  point, so the master ``max z s.t. z <= s_r·μ`` (a K+1-variable LP, solved exactly by
  a small dense simplex in numba, :mod:`packers._lp`) gives an upper estimate and the
  next point; stop when the two agree to ``1e-6`` relative (or 60 cuts). The whole LP
  costs a few milliseconds for 4,096 items (GLOP on the primal took ~0.4 s). The LP
  ignores the pipeline term beyond the single-item bound.

**Min-max packing** (:func:`minmax_pack_lower_bound`, k identical bins, token cap C):
``max t``; ``Σ t / k``; pigeonhole — among the ``ℓk+1`` longest items some bin holds
``ℓ+1``, so ``T >= Σ`` of the ``ℓ+1`` shortest of them (every ``ℓ``); and a capacity
argument — items above ``C/2`` tokens ("big", ``q`` of them) sit in distinct bins, and
an item too large to join the smallest big item must use one of the other ``k - q``
bins, so ``T >= Σ_{such items} t / (k - q)``.

**Bin packing** (:func:`bin_packing_lower_bound`): ``L1 = ceil(Σ s / C)`` and
Martello–Toth ``L2 = max_α |J1| + |J2| + max(0, ceil((Σ_{J3} s − (|J2|·C − Σ_{J2} s)) / C))``
with ``J1 = {s > C − α}``, ``J2 = {C/2 < s <= C − α}``, ``J3 = {α <= s <= C/2}``, over
``α`` in {0} ∪ the distinct sizes ``<= C/2``. ``L2 >= L1`` and ``L2 >= OPT/2``.
"""

from __future__ import annotations

import numpy as np

from packers._lp import type_lp
from packers.validate import (
    as_bin_type,
    as_capacity,
    as_item_times,
    as_num_bins,
    as_pp_weight,
    as_sizes,
    as_speed,
    as_times,
    check_eligible,
)

__all__ = [
    "makespan_lower_bound",
    "lp_type_bound",
    "single_item_bound",
    "volume_bound",
    "combined_makespan_bound",
    "eligibility_pigeonhole_bound",
    "pigeonhole_sum",
    "minmax_pack_lower_bound",
    "bin_packing_lower_bound",
]

_LP_SAFETY = 1.0 - 1e-9
"""The LP value is a float sum of n terms; shave a relative 1e-9 so rounding cannot lift it above the optimum."""


def single_item_bound(times: np.ndarray, bin_type: np.ndarray, speed: np.ndarray, pp_weight: np.ndarray) -> float:
    """``max_i min_j times[i, k_j]·(1 + w_j)/v_j`` on validated inputs (per type, no (n, m) temporary)."""
    best = np.full(times.shape[1], np.inf)
    np.minimum.at(best, bin_type, (1.0 + pp_weight) / speed)
    present = np.isfinite(best)
    return float((times[:, present] * best[present][None, :]).min(axis=1).max())


def volume_bound(times: np.ndarray, bin_type: np.ndarray, speed: np.ndarray) -> float:
    """``Σ_i min_k times[i, k] / Σ_j v_j`` over the types present, on validated inputs."""
    present = np.unique(bin_type)
    return float(times[:, present].min(axis=1).sum() / speed.sum())


def pigeonhole_sum(values: np.ndarray, num_bins: int) -> float:
    """``max_ℓ`` of the sum of the ``ℓ+1`` smallest among the ``ℓ·num_bins + 1`` largest values.

    Placing more than ``ℓ·num_bins`` items on ``num_bins`` bins puts ``ℓ+1`` of them in one
    bin, whose load is then at least that sum. 0.0 when there are at most ``num_bins`` values.
    """
    n = values.shape[0]
    if n <= num_bins:
        return 0.0
    desc = np.sort(values)[::-1]
    prefix = np.concatenate(([0.0], np.cumsum(desc)))
    ell = np.arange(1, (n - 1) // num_bins + 1)
    top = ell * num_bins + 1  # the top ℓk+1 values (1-indexed)
    return float((prefix[top] - prefix[top - ell - 1]).max())


def _l2_bins(asc: np.ndarray, prefix: np.ndarray, cap: float) -> float:
    """Martello–Toth L2 lower bound on the bins of capacity ``cap`` needed by real sizes ``asc``
    (sorted ascending, all <= cap; ``prefix`` their cumulative sums with a leading 0)."""
    n = asc.shape[0]
    half = np.searchsorted(asc, cap / 2.0, side="right")  # items <= cap/2
    alphas = np.concatenate(([0.0], asc[:half]))
    upper = np.searchsorted(asc, cap - alphas, side="right")  # items <= cap - α
    j1 = n - upper
    j2 = np.maximum(upper - half, 0)
    sum_j2 = prefix[np.maximum(upper, half)] - prefix[half]
    j3_lo = np.searchsorted(asc, alphas, side="left")
    sum_j3 = prefix[half] - prefix[np.minimum(j3_lo, half)]
    extra = np.maximum(0.0, np.ceil((sum_j3 - (j2 * cap - sum_j2)) / cap - 1e-12))
    return float((j1 + j2 + extra).max())


def bin_packing_makespan_bound(values: np.ndarray, num_bins: int, known: float, *, rel_tol: float = 1e-3) -> float:
    """Largest makespan T found infeasible for ``values`` on ``num_bins`` identical bins, or ``known``.

    T is infeasible when the Martello–Toth L2 bound says items of these sizes need more
    than ``num_bins`` bins of capacity T. Every infeasible T is a valid lower bound, so the
    binary search between ``known`` (a valid bound) and ``Σ values`` only decides how
    tight the result is, never whether it is valid. Skipped (returns ``known``) when no
    value exceeds ``known / 2``: then L2 reduces to ``ceil(Σ / T)``, no better than volume.
    """
    if values.shape[0] <= num_bins or values.max() <= known / 2.0:
        return known
    asc = np.sort(values)
    prefix = np.concatenate(([0.0], np.cumsum(asc)))
    lo = max(known, float(asc[-1]))
    best = known
    if lo > 0 and _l2_bins(asc, prefix, lo) > num_bins:
        best = lo
    else:
        return best
    hi = float(prefix[-1])
    while hi - lo > rel_tol * lo:
        mid = 0.5 * (lo + hi)
        if _l2_bins(asc, prefix, mid) > num_bins:
            lo = best = mid
        else:
            hi = mid
    return best


def eligibility_pigeonhole_bound(times: np.ndarray, bin_type: np.ndarray, speed: np.ndarray, known: float = 0.0) -> float:
    """Pigeonhole over the bins an item set may use, on validated inputs (``known``: a valid bound so far).

    For every eligibility pattern E (the set of types an item may use), the items whose
    pattern lies inside E can only use the ``m_E`` bins of types in E; each costs at least
    ``e_i = min_{k in E} times[i, k] / (fastest speed of type k)`` on any of them, so
    :func:`pigeonhole_sum` and :func:`bin_packing_makespan_bound` of the ``e_i`` over
    ``m_E`` identical bins bound the makespan.
    """
    num_types = times.shape[1]
    fastest = np.zeros(num_types)
    np.maximum.at(fastest, bin_type, speed)
    count = np.bincount(bin_type, minlength=num_types)
    present = np.flatnonzero(count > 0)
    if present.shape[0] > 62:  # patterns are encoded as bits of an int64
        return known
    elig = np.isfinite(times[:, present])
    codes = (elig.astype(np.int64) << np.arange(present.shape[0], dtype=np.int64)[None, :]).sum(axis=1)
    best = known
    for code in np.unique(codes):
        pattern = ((int(code) >> np.arange(present.shape[0])) & 1).astype(bool)
        inside = (codes & ~int(code)) == 0  # items eligible only within the pattern
        num_bins = int(count[present[pattern]].sum())
        if int(inside.sum()) <= num_bins:
            continue
        cols = present[pattern]
        e = (times[np.ix_(inside, cols)] / fastest[cols][None, :]).min(axis=1)
        best = max(best, pigeonhole_sum(e, num_bins))
        best = bin_packing_makespan_bound(e, num_bins, best)
    return best


def combined_makespan_bound(
    times: np.ndarray, bin_type: np.ndarray, speed: np.ndarray, pp_weight: np.ndarray, lp_value: float, *, pigeonhole: bool = True
) -> float:
    """max(single item, volume, LP value · (1 − 1e-9)[, eligibility pigeonhole]) on validated inputs."""
    known = max(single_item_bound(times, bin_type, speed, pp_weight), volume_bound(times, bin_type, speed), lp_value * _LP_SAFETY)
    return eligibility_pigeonhole_bound(times, bin_type, speed, known) if pigeonhole else known


def lp_type_bound(times: np.ndarray, bin_type: np.ndarray, speed: np.ndarray) -> float:
    """The LP-by-type bound (module docstring) on validated inputs, in seconds.

    Any dual point gives a valid bound, so the value is valid whether or not the cutting
    planes converged; it is 0.0 only for all-zero times.
    """
    value, _, _ = type_lp(times, bin_type, speed)
    return value * _LP_SAFETY


def makespan_lower_bound(
    times: np.ndarray,
    bin_type: np.ndarray,
    *,
    speed: np.ndarray | None = None,
    pp_weight: np.ndarray | None = None,
) -> float:
    """Lower bound (seconds) on the makespan of any assignment: max(single item, volume, LP by type).

    Same inputs as :func:`packers.makespan.lpt_makespan` (capacities are not needed:
    the bound holds with or without them). Raises ``ValueError`` for bad input or an
    item eligible for no bin.
    """
    t = as_times(times)
    bt = as_bin_type(bin_type, t.shape[1])
    m = bt.shape[0]
    v = as_speed(speed, m)
    w = as_pp_weight(pp_weight, m)
    n = t.shape[0]
    check_eligible(t, bt, np.zeros(n, dtype=np.int64), np.ones(m, dtype=np.int64))
    value, _, _ = type_lp(t, bt, v)
    return combined_makespan_bound(t, bt, v, w, value)


def minmax_pack_lower_bound(times: np.ndarray, sizes: np.ndarray, num_bins: int, capacity: int) -> float:
    """Lower bound (seconds) on ``max_j Σ_{i in j} times[i]`` over packings into ``num_bins`` bins of ``capacity`` tokens.

    Raises ``ValueError`` for bad input, an item above ``capacity``, or more tokens than
    ``num_bins · capacity`` (no packing exists).
    """
    t = as_item_times(times)
    s = as_sizes(sizes)
    k = as_num_bins(num_bins)
    cap = as_capacity(capacity)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"sizes has {s.shape[0]} items but times has {t.shape[0]}; give one size per item")
    big_item = np.flatnonzero(s > cap)
    if big_item.size:
        i = int(big_item[0])
        raise ValueError(f"item {i} has {int(s[i])} tokens, above the capacity {cap}; split or truncate it")
    if int(s.sum()) > k * cap:
        raise ValueError(f"{int(s.sum())} tokens cannot fit in {k} bins of {cap} tokens ({k * cap}); add bins")
    bound = max(float(t.max()), float(t.sum()) / k, pigeonhole_sum(t, k))
    # capacity: items that cannot share a bin with any big item use the k - q other bins
    big = s > cap / 2
    q = int(big.sum())
    if 0 < q < k:
        lonely = (~big) & (s > cap - int(s[big].min()))
        if lonely.any():
            bound = max(bound, float(t[lonely].sum()) / (k - q))
    return bound


def bin_packing_lower_bound(sizes: np.ndarray, capacity: int) -> int:
    """Martello–Toth L2 lower bound (>= L1 = ceil(Σ/C)) on the number of bins of ``capacity`` tokens.

    Raises ``ValueError`` for bad input or an item above ``capacity``.
    """
    s = as_sizes(sizes)
    cap = as_capacity(capacity)
    big_item = np.flatnonzero(s > cap)
    if big_item.size:
        i = int(big_item[0])
        raise ValueError(f"item {i} has {int(s[i])} tokens, above the capacity {cap}; split or truncate it")
    asc = np.sort(s)
    prefix = np.concatenate(([0], np.cumsum(asc)))
    total = int(prefix[-1])
    l1 = -(-total // cap)
    half = cap // 2  # s <= C/2  <=>  s <= floor(C/2) for integers
    alphas = np.concatenate(([0], np.unique(asc[asc <= half])))

    def count_le(x: np.ndarray) -> np.ndarray:
        return np.searchsorted(asc, x, side="right")

    def count_lt(x: np.ndarray) -> np.ndarray:
        return np.searchsorted(asc, x, side="left")

    n = asc.shape[0]
    n_le_half = count_le(np.array([half]))[0]
    upper = count_le(cap - alphas)  # items with s <= C - α
    j1 = n - upper  # s > C - α
    j2_lo, j2_hi = n_le_half, upper  # C/2 < s <= C - α  (indices j2_lo .. j2_hi-1)
    j2 = np.maximum(j2_hi - j2_lo, 0)
    sum_j2 = np.where(j2 > 0, prefix[np.maximum(j2_hi, j2_lo)] - prefix[j2_lo], 0)
    j3_lo = count_lt(alphas)
    sum_j3 = prefix[n_le_half] - prefix[np.minimum(j3_lo, n_le_half)]
    room = j2 * cap - sum_j2
    extra = np.maximum(0, -(-(sum_j3 - room) // cap))
    l2 = int((j1 + j2 + extra).max())
    return max(l1, l2)
