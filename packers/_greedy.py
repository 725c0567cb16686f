"""Greedy placement kernels for the assignment problems (see :mod:`packers._state`).

Items are placed one by one in a given order; the rules are described in
:func:`_greedy_kernel` and :func:`solve_greedy`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from packers._state import Instance, _class_pick, _new_state, _tree_set, bin_loads, cls_args
from packers.binpack import decreasing_order

__all__ = ["GreedyFailure", "descending_order", "difficulty", "solve_greedy"]

_INF = np.inf
_NO_FIT = np.int64(2**62)  # larger than any residual token count
_MANY_ITEMS_PER_BIN = 16  # from here on the LP-guided greedy start is kept (benchmarked)
_SMALL_SORT = 256  # up to here a stable argsort beats ranks + counting sort (same order)


@njit(cache=True, nogil=True)
def _greedy_kernel(
    order, rule, times, bin_type, speed, pp_weight, sizes, bin_capacity,
    cls_of, cls_pos, cls_type, cls_cap, cls_ptr, cls_bins, cls_off, cls_leaves, tree_size,
):
    """Place items in ``order``. Rule 0: the bin with the smallest resulting load. Rule 1:
    the eligible bin with the fewest tokens left after placing (best fit), ties by load.
    Rule 2 (for LP-guided times): the bin with the smallest *projected* load — its
    resulting load plus ``owed_k / V_k``, where ``owed_k`` is the work of the items that
    may only use type k and are not placed yet. Within a type this is rule 0; across
    types it steers flexible items away from types that single-type items will fill.
    Returns (bin_of, -1) or (partial bin_of, index of the first item that fits nowhere)."""
    n = times.shape[0]
    m = bin_type.shape[0]
    num_types = times.shape[1]
    bin_of = np.full(n, -1, dtype=np.int64)
    head, nxt, prv, fs, ist, tval, tidx = _new_state(
        times, bin_type, speed, pp_weight, sizes, bin_of, cls_of, cls_pos, cls_off, cls_leaves, tree_size
    )
    num_cls = cls_type.shape[0]
    type_speed = np.zeros(num_types)  # V_k
    for j in range(m):
        type_speed[bin_type[j]] += speed[j]
    owed = np.zeros(num_types)  # per type: work of single-type items not placed yet (seconds)
    flexible = np.zeros(n, dtype=np.bool_)
    if rule == 2:
        for i in range(n):
            only = -1
            count = 0
            for k in range(num_types):
                if type_speed[k] > 0.0 and times[i, k] != _INF:
                    count += 1
                    only = k
            if count == 1:
                owed[only] += times[i, only]
            else:
                flexible[i] = True
    for r in range(n):
        i = order[r]
        s = sizes[i]
        pick = -1
        best = _INF
        if rule == 2:
            for c in range(num_cls):
                k = cls_type[c]
                t = times[i, k]
                if t == _INF or s > cls_cap[c]:
                    continue
                j = tidx[cls_off[c] + 1]
                if ist[0, j] + s > bin_capacity[j]:
                    j = _class_pick(c, s, -1, ist, bin_capacity, fs, tval, tidx, cls_off, cls_ptr, cls_bins)
                    if j < 0:
                        continue
                # projected final load: this bin now, plus the type's share of the work still
                # owed to it by single-type items (equal for all bins of one type)
                new = (fs[0, j] + t + pp_weight[j] * max(fs[1, j], t)) / speed[j] + owed[k] / type_speed[k]
                if new < best:
                    best = new
                    pick = j
            if pick >= 0 and not flexible[i]:
                owed[bin_type[pick]] -= times[i, bin_type[pick]]
        elif rule == 0:
            for c in range(num_cls):
                t = times[i, cls_type[c]]
                if t == _INF or s > cls_cap[c]:
                    continue
                j = tidx[cls_off[c] + 1]  # least-loaded bin of the class (fast path)
                if ist[0, j] + s > bin_capacity[j]:
                    j = _class_pick(c, s, -1, ist, bin_capacity, fs, tval, tidx, cls_off, cls_ptr, cls_bins)
                    if j < 0:
                        continue
                new = (fs[0, j] + t + pp_weight[j] * max(fs[1, j], t)) / speed[j]
                if new < best:
                    best = new
                    pick = j
        else:
            least_left = _NO_FIT
            for j in range(m):
                t = times[i, bin_type[j]]
                left = bin_capacity[j] - ist[0, j] - s
                if t == _INF or left < 0:
                    continue
                new = (fs[0, j] + t + pp_weight[j] * max(fs[1, j], t)) / speed[j]
                if left < least_left or (left == least_left and new < best):
                    least_left = left
                    best = new
                    pick = j
        if pick < 0:
            return bin_of, i
        # _state._add(i, pick, ...) written out: a call per item passes 19 arguments, and the
        # reference counting of its 17 arrays made the loop ~4x slower (measured; the same
        # statements in place run at ~40 ns per item).
        j = pick
        t = times[i, bin_type[j]]
        prv[i] = -1
        nxt[i] = head[j]
        if head[j] >= 0:
            prv[head[j]] = i
        head[j] = i
        bin_of[i] = j
        fs[0, j] += t
        if t > fs[1, j]:
            fs[2, j] = fs[1, j]
            fs[1, j] = t
        elif t > fs[2, j]:
            fs[2, j] = t
        ist[0, j] += sizes[i]
        ist[1, j] += 1
        fs[3, j] = (fs[0, j] + pp_weight[j] * fs[1, j]) / speed[j]
        c = cls_of[j]
        _tree_set(tval, tidx, cls_off[c], cls_leaves[c], cls_pos[j], fs[3, j], j)
    return bin_of, -1




def descending_order(values: np.ndarray) -> np.ndarray:
    """Indices by decreasing value, ties by increasing index: ``np.lexsort((ids, -values))``
    for values without NaN, computed as ranks among the distinct values (a sort of the
    values only) plus a stable counting sort of the ranks — several times faster than a
    stable float sort, and the same answer on every machine."""
    if values.shape[0] <= _SMALL_SORT:
        return np.argsort(-values, kind="stable")
    _, rank = np.unique(values, return_inverse=True)  # rank among distinct values, 0 = smallest
    return decreasing_order(rank.reshape(-1).astype(np.int64) + 1)


class GreedyFailure(ValueError):
    """No greedy rule could place every item within the token capacities."""




def difficulty(inst: Instance, times: np.ndarray) -> np.ndarray:
    """Per item: its smallest single-item load ``t·(1 + w)/v`` over the bins it may go to."""
    num_types = times.shape[1]
    factor = np.full(num_types, np.inf)  # per type: smallest (1 + w)/v among its bins
    np.minimum.at(factor, inst.bin_type, (1.0 + inst.pp_weight) / inst.speed)
    type_cap = np.full(num_types, -1, dtype=np.int64)
    np.maximum.at(type_cap, inst.bin_type, inst.bin_capacity)
    present = np.flatnonzero(type_cap >= 0)
    t = times[:, present] * factor[present][None, :]
    if inst.has_capacity:
        t = np.where(inst.sizes[:, None] <= type_cap[present][None, :], t, np.inf)
    return t.min(axis=1)


def solve_greedy(inst: Instance, allowed: np.ndarray | None = None) -> tuple[np.ndarray, str]:
    """Greedy placement, trying rules in turn until one places every item:

    1. with ``allowed`` (bool[n, K], e.g. the LP's type split): LPT restricted to the
       allowed types, least projected load (``"lp-lpt"``, rule 2 of the kernel). With at
       least ``_MANY_ITEMS_PER_BIN`` items per bin it is used as is: the local search
       repairs its imbalance but not a poor type split. With fewer, rounding the LP
       split per bin costs more, so it competes with rule 2 on greedy makespan;
    2. LPT by difficulty, least resulting load (``"lpt"``);
    3. with token capacities: largest size first, least resulting load (``"lpt-by-size"``);
       then largest size first, best fit by tokens (``"best-fit"``).

    Returns (bin_of, rule name); raises :class:`GreedyFailure` when every rule fails.
    """
    ids = np.arange(inst.n)
    cached: dict[str, np.ndarray] = {}

    def diff() -> np.ndarray:
        if "diff" not in cached:
            cached["diff"] = difficulty(inst, inst.times)
        return cached["diff"]

    def by_size() -> np.ndarray:
        if "by_size" not in cached:
            cached["by_size"] = np.lexsort((ids, -diff(), -inst.sizes))
        return cached["by_size"]

    # (order, rule, name, times); orders are built only when their attempt runs
    attempts: list[tuple[Any, int, str, np.ndarray]] = []
    if allowed is not None:
        guided = np.ascontiguousarray(np.where(allowed, inst.times, np.inf))
        attempts.append((lambda: descending_order(difficulty(inst, guided)), 2, "lp-lpt", guided))
    attempts.append((lambda: descending_order(diff()), 0, "lpt", inst.times))
    if inst.has_capacity:
        attempts += [(by_size, 0, "lpt-by-size", inst.times), (by_size, 1, "best-fit", inst.times)]
    failed = -1
    found: list[tuple[float, np.ndarray, str]] = []
    args = cls_args(inst)
    for make_order, rule, name, times in attempts:
        bin_of, failed = _greedy_kernel(
            make_order().astype(np.int64), rule, times, inst.bin_type, inst.speed, inst.pp_weight,
            inst.sizes, inst.bin_capacity, *args,
        )
        if failed < 0:
            found.append((float(bin_loads(inst.times, inst.bin_type, inst.speed, inst.pp_weight, bin_of).max()), bin_of, name))
            if name != "lp-lpt" or inst.n >= _MANY_ITEMS_PER_BIN * inst.m:
                break
    if found:
        _, bin_of, name = min(found, key=lambda f: f[0])
        return bin_of, name
    i = int(failed)
    raise GreedyFailure(
        f"could not place item {i} ({int(inst.sizes[i])} tokens): every bin it may go to is full "
        f"(total {int(inst.sizes.sum())} tokens, total capacity {int(inst.bin_capacity.sum())} tokens); "
        "the instance may be infeasible — add bins or capacity, or try the CP-SAT model"
    )
