"""Stage 2: cut each replica's sequences into micro-batches.

A replica of layout ``(tp, cp, pp)`` given sequences with times ``t_i`` runs ``v``
micro-batches ``m_1..m_v`` (each at most ``capacity`` tokens) in

    (Σ_k T(m_k) + v·c + (pp−1)·max_k T(m_k)) / speed        T(m) = Σ_{i∈m} t_i

seconds (:func:`balancer.cost.replica_seconds`). Each ``t_i = a·s_i² + b·s_i + d``
carries the per-sequence overhead ``d`` (:func:`balancer.stage1.item_seconds`): a
sequence pays it in whichever micro-batch it lands, so the packers see plain item times
and need no term of their own. ``Σ T`` is fixed by stage 1, so:

* ``pp = 1``: only ``v`` matters — bin packing by tokens for the fewest micro-batches
  (:func:`packers.first_fit_decreasing`: the same 11/9·OPT + 6/9 guarantee as best fit,
  and its set-up cost does not grow with the token capacity, which matters for the many
  small replicas packed per step). With ``balance_times`` the same number of bins is
  then re-packed to even out their times (:func:`packers.minmax_pack`); the estimate does
  not change, but equal micro-batches smooth memory peaks and per-micro-batch timings.
* ``pp > 1``: the bubble ``(pp−1)·max T`` wants many small micro-batches, the overhead
  ``v·c`` wants few. For ``v`` from ``max(pp, bins needed)`` upward, min-max packing
  (:func:`packers.minmax_pack`) gives the smallest ``max T`` for that ``v``; the search stops
  once ``Σ t + v·c + (pp−1)·max t_i`` (a bound for every larger ``v``) cannot beat the best.

Replicas that need no search are handled for all replicas at once with numpy: an idle
replica gets one empty micro-batch ``[]``; a ``pp = 1`` replica whose tokens fit one
micro-batch gets exactly one; a pipeline with at most ``pp`` sequences gives each its own
micro-batch and pads with empty ones up to ``pp`` (optimal: ``max T`` cannot go below the
longest item and ``v`` cannot go below ``pp``).

**Execution order** (:meth:`MicroBatches.execution_order`):

* ``pp = 1``: longest micro-batch first. Time does not depend on the order; putting the
  largest activation footprint first lets the caching allocator reuse its blocks for the
  smaller ones that follow, and an out-of-memory error shows at the first micro-batch.
* ``pp > 1`` (1F1B): short micro-batches at both ends, the longest in the middle
  (ascending times placed alternately at the front and the back). The warm-up exposes the
  first micro-batch's forward on every stage and the cool-down the last one's backward,
  so small ends shrink the exposed fill and drain. Empty padding micro-batches count as
  the shortest and so sit at the ends. This order is also what keeps the replica formula
  above honest: the runtime's exact 1F1B schedule, replayed on micro-batches in this order
  (:func:`strategies.stages.simulate_1f1b`, forward ⅓ and backward ⅔ of ``T``, stages no
  slower than the one priced), never exceeds ``Σ T + (pp−1)·max T``
  (``tests/test_microbatch.py``, pp 2–4, ``v ≥ pp``, random times; checked, not proved).
  In other orders it can: long micro-batches alternating with short ones stall 1F1B up to
  1.42× the formula in the test's example.

Inside a micro-batch, sequences keep their order in the step's batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

import packers
from packers._greedy import _greedy_kernel
from packers._search import _improve_kernel
from packers.binpack import _first_fit, first_fit_decreasing_groups

from .stage1 import ReplicaTable

__all__ = ["MicroBatches", "pack_micro_batches", "pack_replica"]


@dataclass(frozen=True, eq=False)
class MicroBatches:
    """Stage-2 answer for every replica of one strategy (positions are batch positions)."""

    table: ReplicaTable
    bin_of: np.ndarray
    """int64[n], replica of each sequence."""
    mb_of: np.ndarray
    """int64[n], micro-batch of each sequence within its replica (packing order, not execution order)."""
    num_micro_batches: np.ndarray
    """int64[m], micro-batches per replica (1 for an idle replica: one empty micro-batch)."""
    mb_start: np.ndarray
    """int64[m+1], offsets of each replica's micro-batches in :attr:`mb_seconds`."""
    mb_seconds: np.ndarray
    """float64[Σ v], ``T(m)`` of every micro-batch at nominal speed, replica-major."""
    est_seconds: np.ndarray
    """float64[m], replica times at the replicas' speeds (0 for an idle replica)."""

    @property
    def step_seconds(self) -> float:
        """Estimated step time: the slowest replica, seconds."""
        return float(self.est_seconds.max())

    def execution_order(self) -> np.ndarray:
        """int64[Σ v]: execution slot (within its replica) of every micro-batch (module docstring)."""
        m = self.table.num_replicas
        v = self.num_micro_batches
        rep_of_mb = np.repeat(np.arange(m, dtype=np.int64), v)
        pp_of_mb = self.table.pp[self.table.bin_type][rep_of_mb]
        flat = np.arange(self.mb_seconds.size, dtype=np.int64)
        # pp = 1 sorts by descending time, pp > 1 by ascending time; ties by packing index.
        key = np.where(pp_of_mb > 1, self.mb_seconds, -self.mb_seconds)
        perm = np.lexsort((flat, key, rep_of_mb))
        rank = np.empty_like(flat)
        rank[perm] = flat - self.mb_start[rep_of_mb[perm]]
        v_of_mb = v[rep_of_mb]
        mountain = np.where(rank % 2 == 0, rank // 2, v_of_mb - 1 - rank // 2)
        return np.where(pp_of_mb > 1, mountain, rank)

    def flat_order(self) -> tuple[np.ndarray, np.ndarray]:
        """``(order, bounds)``: batch positions sorted by (replica, execution slot, position), and
        int64[Σ v + 1] offsets of every micro-batch in ``order`` (replica-major, execution order)."""
        slot = self.execution_order()
        g = self.mb_start[self.bin_of] + self.mb_of
        flat_slot = self.mb_start[self.bin_of] + slot[g]
        order = np.lexsort((np.arange(self.bin_of.size), flat_slot))
        sizes = np.bincount(flat_slot, minlength=self.mb_seconds.size)
        return order, np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)

    def micro_batches(self) -> list[list[np.ndarray]]:
        """Per replica, its micro-batches in execution order as int64 arrays of batch positions."""
        order, bounds = self.flat_order()
        return [
            [order[bounds[k] : bounds[k + 1]] for k in range(self.mb_start[j], self.mb_start[j + 1])]
            for j in range(self.table.num_replicas)
        ]


@njit(cache=True, nogil=True)
def _group_order(bin_of: np.ndarray, m: int) -> np.ndarray:
    """Positions grouped by replica, increasing inside each (= a stable argsort of
    ``bin_of``, by counting sort in O(n + m))."""
    start = np.zeros(m + 1, dtype=np.int64)
    for i in range(bin_of.shape[0]):
        start[bin_of[i] + 1] += 1
    for j in range(m):
        start[j + 1] += start[j]
    order = np.empty(bin_of.shape[0], dtype=np.int64)
    for i in range(bin_of.shape[0]):
        order[start[bin_of[i]]] = i
        start[bin_of[i]] += 1
    return order


@njit(cache=True, nogil=True)
def _minmax_trusted(times, sizes, k, capacity):
    """:func:`packers.minmax_pack` (``require_nonempty=True``, default rounds) on inputs
    valid by construction, in numba: the same kernels, orders and fallbacks, so the same
    answer. Returns ``(bin_of, found)``; ``found`` is False where ``minmax_pack`` raises
    (no greedy rule and no first-fit decreasing packing fits ``k`` bins)."""
    n = times.shape[0]
    t2 = np.empty((n, 1))
    for i in range(n):
        t2[i, 0] = times[i]
    bin_type = np.zeros(k, dtype=np.int64)
    speed = np.ones(k)
    pp_weight = np.zeros(k)
    bin_capacity = np.full(k, capacity, dtype=np.int64)
    leaves = 1
    while leaves < k:
        leaves *= 2
    cls_of = np.zeros(k, dtype=np.int64)
    cls_pos = np.arange(k)
    cls_type = np.zeros(1, dtype=np.int64)
    cls_cap = np.full(1, capacity, dtype=np.int64)
    cls_ptr = np.array([0, k], dtype=np.int64)
    cls_bins = np.arange(k)
    cls_off = np.zeros(1, dtype=np.int64)
    cls_leaves = np.full(1, leaves, dtype=np.int64)
    tree_size = 2 * leaves
    # greedy rules in solve_greedy's order: LPT by time, largest size first, best fit
    by_time = np.argsort(-times, kind="mergesort")
    by_size = by_time[np.argsort(-sizes[by_time], kind="mergesort")]
    bin_of = np.full(n, -1, dtype=np.int64)
    found = False
    for attempt in range(3):
        order = by_time if attempt == 0 else by_size
        rule = 1 if attempt == 2 else 0
        bin_of, failed = _greedy_kernel(
            order, rule, t2, bin_type, speed, pp_weight, sizes, bin_capacity,
            cls_of, cls_pos, cls_type, cls_cap, cls_ptr, cls_bins, cls_off, cls_leaves, tree_size,
        )
        if failed < 0:
            found = True
            break
    if not found:  # minmax_greedy's fallback: first-fit decreasing by tokens
        bin_of, used = _first_fit(np.argsort(-sizes, kind="mergesort"), sizes, capacity)
        if used > k:
            return bin_of, False
    stats = np.zeros(5, dtype=np.int64)
    _improve_kernel(
        bin_of, True, True, 256 + k // 2, stats, t2, bin_type, speed, pp_weight, sizes, bin_capacity,
        cls_of, cls_pos, cls_type, cls_cap, cls_ptr, cls_bins, cls_off, cls_leaves, tree_size,
    )
    return bin_of, True


@njit(cache=True, nogil=True)
def _pipeline_kernel(sizes, times, capacity, c, pp, max_extra, sum_t, t_max, total_tokens):
    n = sizes.shape[0]
    best_mb, v0 = _first_fit(np.argsort(-sizes, kind="mergesort"), sizes, capacity)
    v0 = max(pp, v0)
    # Fallback that is always feasible: the bin-packing answer, padded with empty micro-batches.
    loads = np.zeros(v0)
    for i in range(n):
        loads[best_mb[i]] += times[i]
    best = sum_t + v0 * c + (pp - 1) * loads.max()
    best_v = v0
    for v in range(v0, min(n, v0 + max_extra) + 1):
        if sum_t + v * c + (pp - 1) * t_max >= best:
            break  # every larger v costs more than the best already found
        if sum_t + v * c + (pp - 1) * max(t_max, sum_t / v) >= best:
            continue
        if v == n:
            mb = np.arange(n)
            max_t = t_max
        else:
            if total_tokens > v * capacity:
                continue  # no packing into v bins under the cap
            mb, ok = _minmax_trusted(times, sizes, v, capacity)
            if not ok:
                continue  # the heuristic found no packing into v bins under the cap
            loads = np.zeros(v)
            for i in range(n):
                loads[mb[i]] += times[i]
            max_t = loads.max()
        est = sum_t + v * c + (pp - 1) * max_t
        if est < best:
            best = est
            best_mb = mb
            best_v = v
    return best_mb, best_v


def _pipeline_search(
    sizes: np.ndarray, times: np.ndarray, capacity: int, c: float, pp: int, max_extra: int
) -> tuple[np.ndarray, int]:
    """Best ``(micro-batch of each item, v)`` for one pipeline replica with more than ``pp`` items.

    For ``v`` from ``max(pp, FFD bins)`` up to ``max_extra`` more, :func:`packers.minmax_pack`
    (its kernels, called from numba: one call per replica) gives the smallest ``max T``;
    the FFD packing padded to ``v`` micro-batches is the always-feasible fallback."""
    sz = np.ascontiguousarray(sizes, dtype=np.int64)
    tm = np.ascontiguousarray(times, dtype=np.float64)
    mb, v = _pipeline_kernel(
        sz, tm, int(capacity), float(c), int(pp), int(max_extra), float(tm.sum()), float(tm.max()), int(sz.sum())
    )
    return np.asarray(mb, dtype=np.int64), int(v)


def pack_replica(
    sizes: np.ndarray,
    times: np.ndarray,
    capacity: int,
    c: float,
    pp: int,
    *,
    max_extra_micro_batches: int = 8,
    balance_times: bool = False,
) -> tuple[np.ndarray, int]:
    """Micro-batches of one replica: ``(micro-batch index of each item, number of micro-batches)``.

    ``sizes`` in tokens (each ``≤ capacity``), ``times`` in seconds at nominal speed.
    """
    n = sizes.size
    if n == 0:
        return np.zeros(0, dtype=np.int64), 1
    if pp > 1:
        if n <= pp:
            return np.arange(n, dtype=np.int64), pp
        return _pipeline_search(sizes, times, capacity, c, pp, max_extra_micro_batches)
    if int(sizes.sum()) <= capacity:
        return np.zeros(n, dtype=np.int64), 1
    ffd = packers.first_fit_decreasing(sizes, capacity)
    mb, v = np.asarray(ffd.bin_of, dtype=np.int64), int(ffd.num_bins)
    if balance_times and v > 1:
        try:
            mb = np.asarray(packers.minmax_pack(times, sizes, v, capacity, require_nonempty=True).bin_of, dtype=np.int64)
        except ValueError:
            pass  # keep the bin-packing answer: same number of micro-batches, same estimate
    return mb, v


def pack_micro_batches(
    table: ReplicaTable,
    bin_of: np.ndarray,
    lengths: np.ndarray,
    times: np.ndarray,
    *,
    max_extra_micro_batches: int = 8,
    balance_times: bool = False,
) -> MicroBatches:
    """Stage 2 for every replica. ``times[i]`` = nominal seconds of sequence ``i`` on its replica's layout."""
    m = table.num_replicas
    n = lengths.size
    rtype = table.bin_type
    cap_r = table.capacity[rtype]
    pp_r = table.pp[rtype]
    c_r = table.c[rtype]
    count = np.bincount(bin_of, minlength=m)
    tokens = np.bincount(bin_of, weights=lengths.astype(np.float64), minlength=m)

    # Easy replicas, all at once: one micro-batch (pp = 1, fits) or one item per micro-batch (pp > 1, ≤ pp items).
    order = _group_order(bin_of, m)
    starts = np.concatenate(([0], np.cumsum(count)))
    rank_in_rep = np.empty(n, dtype=np.int64)
    rank_in_rep[order] = np.arange(n, dtype=np.int64) - starts[bin_of[order]]
    pipeline_item = (pp_r > 1)[bin_of]
    mb_of = np.where(pipeline_item, rank_in_rep, 0).astype(np.int64)
    v = np.where((pp_r > 1) & (count > 0), pp_r, 1).astype(np.int64)

    # pp = 1 replicas over their capacity: first-fit decreasing for every replica in one numba call.
    over = np.flatnonzero((count > 0) & (pp_r == 1) & (tokens > cap_r))
    if over.size and not balance_times:
        is_over = np.zeros(m, dtype=bool)
        is_over[over] = True
        group = np.where(is_over[bin_of], bin_of, -1)
        local, used = first_fit_decreasing_groups(lengths, group, cap_r)
        packed = group >= 0
        mb_of[packed] = local[packed]
        v[over] = used[over]
        over = over[:0]
    # the rest, one replica at a time: pipelines that need a search, and balanced pp = 1 packing
    hard = np.union1d(over, np.flatnonzero((count > 0) & (pp_r > 1) & (count > pp_r)))
    for j in hard.tolist():
        idx = order[starts[j] : starts[j + 1]]
        local, v[j] = pack_replica(
            lengths[idx],
            times[idx],
            int(cap_r[j]),
            float(c_r[j]),
            int(pp_r[j]),
            max_extra_micro_batches=max_extra_micro_batches,
            balance_times=balance_times,
        )
        mb_of[idx] = local

    mb_start = np.concatenate(([0], np.cumsum(v))).astype(np.int64)
    mb_seconds = np.bincount(mb_start[bin_of] + mb_of, weights=times, minlength=int(mb_start[-1]))
    sum_t = np.add.reduceat(mb_seconds, mb_start[:-1])
    max_t = np.maximum.reduceat(mb_seconds, mb_start[:-1])
    # Same formula as balancer.cost.replica_seconds, vectorised over replicas.
    est = (sum_t + v * c_r + (pp_r - 1) * max_t) / table.speed
    est[count == 0] = 0.0
    return MicroBatches(
        table=table,
        bin_of=bin_of,
        mb_of=mb_of,
        num_micro_batches=v,
        mb_start=mb_start,
        mb_seconds=mb_seconds,
        est_seconds=est,
    )
