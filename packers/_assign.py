"""numba kernels for assigning items to a fixed set of bins (shared by makespan and min-max).

An instance has ``n`` items and ``m`` bins. Bin ``j`` has a type ``k = bin_type[j]``, a
speed ``v_j``, a pipeline weight ``w_j`` and a token capacity ``cap_j``. Item ``i`` takes
``times[i, k]`` seconds on a bin of type ``k`` (``inf`` = not eligible) and ``sizes[i]``
tokens. The load of bin ``j`` holding items ``I_j`` is

    load_j = (S_j + w_j · M_j) / v_j,   S_j = Σ_{i∈I_j} times[i, k],  M_j = max_{i∈I_j} times[i, k].

Bins with the same (type, speed, weight, capacity) form a *class*; they are
interchangeable, so a greedy step only needs the least-loaded bin of each class. Each
class keeps a min-tree over its bins' loads (root = least-loaded bin, update O(log)).

Per-bin state while a kernel runs:

    fs[0, j] = S_j     fs[1, j] = M_j (largest time)   fs[2, j] = second largest time
    fs[3, j] = load_j  ist[0, j] = tokens used          ist[1, j] = number of items
    head[j] → nxt[i] / prv[i]: doubly linked list of the items in bin j
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from packers.validate import UNLIMITED_TOKENS

__all__ = ["Instance", "SearchReport", "build_instance", "solve_greedy", "improve", "bin_loads", "GreedyFailure"]

_INF = np.inf
_NO_FIT = np.int64(2**62)  # larger than any residual token count
_MIN_GAIN = 1e-4  # a step must lower the bottleneck bin by this fraction of its load
_SWAP_PARTNERS = 4  # narrow phase: swaps with the 4 least-loaded class roots
_WIDE_PER_TYPE = 16  # wide phase (only when the narrow one fails): the 16 least-loaded bins of every type


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    """A validated instance plus its bin classes (see the module docstring)."""

    times: np.ndarray  # float64[n, K]
    bin_type: np.ndarray  # int64[m]
    speed: np.ndarray  # float64[m]
    pp_weight: np.ndarray  # float64[m]
    sizes: np.ndarray  # int64[n]; zeros when no token capacity applies
    bin_capacity: np.ndarray  # int64[m]; UNLIMITED_TOKENS when none
    cls_of: np.ndarray  # int64[m]: class of every bin
    cls_pos: np.ndarray  # int64[m]: position of the bin inside its class
    cls_type: np.ndarray  # int64[C]
    cls_cap: np.ndarray  # int64[C]
    cls_ptr: np.ndarray  # int64[C+1]: cls_bins[cls_ptr[c]:cls_ptr[c+1]] are the bins of class c
    cls_bins: np.ndarray  # int64[m]
    cls_off: np.ndarray  # int64[C]: offset of class c's tree in the flat tree arrays
    cls_leaves: np.ndarray  # int64[C]: leaves of class c's tree (a power of two)

    @property
    def n(self) -> int:
        return int(self.times.shape[0])

    @property
    def m(self) -> int:
        return int(self.bin_type.shape[0])

    @property
    def has_capacity(self) -> bool:
        return bool((self.bin_capacity < UNLIMITED_TOKENS).any())


def build_instance(
    times: np.ndarray,
    bin_type: np.ndarray,
    speed: np.ndarray,
    pp_weight: np.ndarray,
    sizes: np.ndarray,
    bin_capacity: np.ndarray,
) -> Instance:
    """Group bins into classes of identical (type, speed, pp_weight, capacity); inputs already validated.

    Classes are numbered in the sorted order of their keys (deterministic)."""
    m = bin_type.shape[0]
    cls_bins = np.lexsort((bin_capacity, pp_weight, speed, bin_type)).astype(np.int64)  # stable: bin order kept
    cols = (bin_type[cls_bins], speed[cls_bins], pp_weight[cls_bins], bin_capacity[cls_bins])
    starts = np.zeros(m, dtype=bool)
    starts[0] = True
    for col in cols:
        starts[1:] |= col[1:] != col[:-1]
    cls_sorted = np.cumsum(starts) - 1
    num_cls = int(cls_sorted[-1]) + 1
    cls_of = np.empty(m, dtype=np.int64)
    cls_of[cls_bins] = cls_sorted
    first = cls_bins[starts]  # one bin per class
    counts = np.bincount(cls_of, minlength=num_cls)
    cls_ptr = np.zeros(num_cls + 1, dtype=np.int64)
    np.cumsum(counts, out=cls_ptr[1:])
    cls_pos = np.empty(m, dtype=np.int64)
    cls_pos[cls_bins] = np.arange(m) - cls_ptr[cls_of[cls_bins]]
    leaves = np.left_shift(1, np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64)).astype(np.int64)
    cls_off = np.zeros(num_cls, dtype=np.int64)
    np.cumsum(2 * leaves[:-1], out=cls_off[1:])
    return Instance(
        times=times,
        bin_type=bin_type,
        speed=speed,
        pp_weight=pp_weight,
        sizes=sizes,
        bin_capacity=bin_capacity,
        cls_of=cls_of,
        cls_pos=cls_pos,
        cls_type=bin_type[first].astype(np.int64),
        cls_cap=bin_capacity[first].astype(np.int64),
        cls_ptr=cls_ptr,
        cls_bins=cls_bins,
        cls_off=cls_off,
        cls_leaves=leaves,
    )


# ----------------------------------------------------------------------------------------
# loads


@njit(cache=True)
def bin_loads(
    times: np.ndarray, bin_type: np.ndarray, speed: np.ndarray, pp_weight: np.ndarray, bin_of: np.ndarray
) -> np.ndarray:
    """Exact loads ``(S_j + w_j·M_j) / v_j`` of an assignment (sums in item order)."""
    m = bin_type.shape[0]
    s = np.zeros(m)
    mx = np.zeros(m)
    for i in range(bin_of.shape[0]):
        j = bin_of[i]
        t = times[i, bin_type[j]]
        s[j] += t
        if t > mx[j]:
            mx[j] = t
    out = np.empty(m)
    for j in range(m):
        out[j] = (s[j] + pp_weight[j] * mx[j]) / speed[j]
    return out


# ----------------------------------------------------------------------------------------
# per-bin state and class trees


@njit(cache=True, inline="always")
def _tree_set(tval, tidx, off, leaves, pos, val, j):
    node = leaves + pos
    tval[off + node] = val
    tidx[off + node] = j
    node >>= 1
    while node >= 1:
        left = off + 2 * node
        if tval[left + 1] < tval[left]:
            tval[off + node] = tval[left + 1]
            tidx[off + node] = tidx[left + 1]
        else:
            tval[off + node] = tval[left]
            tidx[off + node] = tidx[left]
        node >>= 1


@njit(cache=True, inline="always")
def _rescan(j, k, times, head, nxt, fs):
    """Recompute S_j, M_j and the second-largest time of bin j from its item list."""
    total = 0.0
    first = 0.0
    second = 0.0
    i = head[j]
    while i >= 0:
        t = times[i, k]
        total += t
        if t > first:
            second = first
            first = t
        elif t > second:
            second = t
        i = nxt[i]
    fs[0, j] = total
    fs[1, j] = first
    fs[2, j] = second


@njit(cache=True)
def _new_state(times, bin_type, speed, pp_weight, sizes, bin_of, cls_of, cls_pos, cls_off, cls_leaves, tree_size):
    n = times.shape[0]
    m = bin_type.shape[0]
    head = np.full(m, -1, dtype=np.int64)
    nxt = np.full(n, -1, dtype=np.int64)
    prv = np.full(n, -1, dtype=np.int64)
    fs = np.zeros((4, m))
    ist = np.zeros((2, m), dtype=np.int64)
    for i in range(n - 1, -1, -1):  # link in reverse so lists run in increasing item order
        j = bin_of[i]
        if j < 0:
            continue
        nxt[i] = head[j]
        if head[j] >= 0:
            prv[head[j]] = i
        head[j] = i
        ist[0, j] += sizes[i]
        ist[1, j] += 1
    tval = np.full(tree_size, _INF)
    tidx = np.full(tree_size, -1, dtype=np.int64)
    for j in range(m):
        _rescan(j, bin_type[j], times, head, nxt, fs)
        fs[3, j] = (fs[0, j] + pp_weight[j] * fs[1, j]) / speed[j]
        c = cls_of[j]
        _tree_set(tval, tidx, cls_off[c], cls_leaves[c], cls_pos[j], fs[3, j], j)
    return head, nxt, prv, fs, ist, tval, tidx


@njit(cache=True, inline="always")
def _add(i, j, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves):
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


@njit(cache=True, inline="always")
def _remove(i, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves):
    j = bin_of[i]
    if prv[i] >= 0:
        nxt[prv[i]] = nxt[i]
    else:
        head[j] = nxt[i]
    if nxt[i] >= 0:
        prv[nxt[i]] = prv[i]
    nxt[i] = -1
    prv[i] = -1
    bin_of[i] = -1
    ist[0, j] -= sizes[i]
    ist[1, j] -= 1
    _rescan(j, bin_type[j], times, head, nxt, fs)  # exact sums: no drift from repeated +/-
    fs[3, j] = (fs[0, j] + pp_weight[j] * fs[1, j]) / speed[j]
    c = cls_of[j]
    _tree_set(tval, tidx, cls_off[c], cls_leaves[c], cls_pos[j], fs[3, j], j)


@njit(cache=True)
def _class_pick(c, s, exclude, ist, bin_capacity, fs, tval, tidx, cls_off, cls_ptr, cls_bins):
    """Least-loaded bin of class c with room for s tokens (not ``exclude``); -1 if none."""
    j = tidx[cls_off[c] + 1]
    if j >= 0 and j != exclude and ist[0, j] + s <= bin_capacity[j]:
        return j
    best = _INF
    pick = -1
    for p in range(cls_ptr[c], cls_ptr[c + 1]):
        q = cls_bins[p]
        if q != exclude and ist[0, q] + s <= bin_capacity[q] and fs[3, q] < best:
            best = fs[3, q]
            pick = q
    return pick


# ----------------------------------------------------------------------------------------
# greedy


@njit(cache=True)
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
        _add(i, pick, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
    return bin_of, -1


# ----------------------------------------------------------------------------------------
# non-empty repair and local search


@njit(cache=True)
def _fill_empty_bins(times, bin_type, speed, pp_weight, sizes, bin_capacity, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves, cls_type, cls_cap):
    """Give every empty bin an item, along augmenting paths where needed.

    From an empty bin e, search (breadth first) over bins: an item eligible for the
    current bin u that sits in a bin with >= 2 items ends the path; an item that is
    alone in its bin p extends it (p would empty, so p needs an item in turn). Applying
    a path moves one item into every bin on it, so no bin empties. The candidates of a
    bin are read from a per-class list of eligible items. When a search fails, the
    other empty bins of that class (same eligibility) are skipped for the rest of the
    pass, and the bins it reached stay marked (dead ends) until a path is applied;
    passes repeat while any path was applied, so on return no empty bin has an
    augmenting path: as many bins are filled as eligibility allows. Returns the number
    of bins still empty.
    """
    n = times.shape[0]
    m = bin_type.shape[0]
    num_cls = cls_type.shape[0]
    still_empty = 0
    for e in range(m):
        if ist[1, e] == 0:
            still_empty += 1
    if still_empty == 0:
        return 0
    # eligible items of every class (CSR)
    ptr = np.zeros(num_cls + 1, dtype=np.int64)
    for c in range(num_cls):
        k = cls_type[c]
        cnt = 0
        for i in range(n):
            if times[i, k] != _INF and sizes[i] <= cls_cap[c]:
                cnt += 1
        ptr[c + 1] = ptr[c] + cnt
    elig = np.empty(ptr[num_cls], dtype=np.int64)
    for c in range(num_cls):
        k = cls_type[c]
        q = ptr[c]
        for i in range(n):
            if times[i, k] != _INF and sizes[i] <= cls_cap[c]:
                elig[q] = i
                q += 1
    parent = np.full(m, -1, dtype=np.int64)  # bin the item of this bin moves to
    via = np.full(m, -1, dtype=np.int64)  # the single item of this bin that moves to parent
    seen = np.zeros(m, dtype=np.bool_)
    dead = np.zeros(num_cls, dtype=np.bool_)
    queue = np.empty(m, dtype=np.int64)
    changed = True
    while changed:
        changed = False
        dead[:] = False
        stale = True
        for e in range(m):
            if ist[1, e] > 0 or dead[cls_of[e]]:
                continue
            # bins reached by a failed search stay dead ends until a path is applied,
            # so the marks are cleared only after a success
            if stale:
                seen[:] = False
                stale = False
            seen[e] = True
            queue[0] = e
            qhead = 0
            qtail = 1
            end_bin = -1
            end_item = -1
            while qhead < qtail and end_item < 0:
                u = queue[qhead]
                qhead += 1
                ku = bin_type[u]
                cu = cls_of[u]
                best = _INF
                for q in range(ptr[cu], ptr[cu + 1]):
                    i = elig[q]
                    p = bin_of[i]
                    if p == u or ist[0, u] + sizes[i] > bin_capacity[u]:
                        continue
                    if ist[1, p] >= 2:
                        t = times[i, ku] / speed[u]
                        if t < best:  # cheapest item for u among those free to leave
                            best = t
                            end_item = i
                    elif not seen[p]:
                        seen[p] = True
                        parent[p] = u
                        via[p] = i
                        queue[qtail] = p
                        qtail += 1
                if end_item >= 0:
                    end_bin = u
            if end_item < 0:
                dead[cls_of[e]] = True
                continue
            # shift single items one step towards e along the path, then fill end_bin
            x = end_bin
            while x != e:
                it = via[x]
                _remove(it, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
                _add(it, parent[x], times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
                x = parent[x]
            _remove(end_item, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
            _add(end_item, end_bin, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
            changed = True
            stale = True
    still_empty = 0
    for e in range(m):
        if ist[1, e] == 0:
            still_empty += 1
    return still_empty


@njit(cache=True)
def _best_move(b, keep_nonempty, times, bin_type, speed, pp_weight, sizes, bin_capacity, head, nxt, fs, ist, tval, tidx, cls_type, cls_cap, cls_off, cls_ptr, cls_bins):
    """Best single-item move out of bin b: (item, target, new max of the two loads)."""
    best = fs[3, b] * (1.0 - _MIN_GAIN)
    bi = -1
    bj = -1
    if keep_nonempty and ist[1, b] <= 1:
        return bi, bj, best
    kb = bin_type[b]
    num_cls = cls_type.shape[0]
    i = head[b]
    while i >= 0:
        tb = times[i, kb]
        if ist[1, b] == 1:
            nb = 0.0
        else:
            rest = fs[2, b] if tb == fs[1, b] else fs[1, b]
            nb = (fs[0, b] - tb + pp_weight[b] * rest) / speed[b]
        if nb < best:
            s = sizes[i]
            for c in range(num_cls):
                t = times[i, cls_type[c]]
                if t == _INF or s > cls_cap[c]:
                    continue
                j = tidx[cls_off[c] + 1]  # b is hidden from the trees, so j != b
                if j < 0:
                    continue
                if ist[0, j] + s > bin_capacity[j]:
                    j = _class_pick(c, s, b, ist, bin_capacity, fs, tval, tidx, cls_off, cls_ptr, cls_bins)
                    if j < 0:
                        continue
                nj = (fs[0, j] + t + pp_weight[j] * max(fs[1, j], t)) / speed[j]
                v = max(nb, nj)
                if v < best:
                    best = v
                    bi = i
                    bj = j
        i = nxt[i]
    return bi, bj, best


@njit(cache=True)
def _best_swap(b, partners, num_partners, first, times, bin_type, speed, pp_weight, sizes, bin_capacity, head, nxt, fs, ist, g_id, g_tb, g_tj):
    """Best exchange of an item of bin b with an item of a partner bin: (item in b, other
    item, value). Partners are scanned in the given order; with ``first``, stop after the
    first partner that offers an improving swap (its best one). The partner's items are
    gathered into the scratch arrays ``g_*`` so the pair loop runs over contiguous data."""
    lb = fs[3, b]
    best = lb * (1.0 - _MIN_GAIN)
    bi = -1
    bk = -1
    kb = bin_type[b]
    for q in range(num_partners):
        j = partners[q]
        if j == b:
            continue
        kj = bin_type[j]
        # gather the partner's items: id, time on b's type, time on its own type
        cnt = 0
        i2 = head[j]
        while i2 >= 0:
            g_id[cnt] = i2
            g_tb[cnt] = times[i2, kb]
            g_tj[cnt] = times[i2, kj]
            cnt += 1
            i2 = nxt[i2]
        rest_j1 = fs[1, j]
        rest_j2 = fs[2, j]
        i = head[b]
        while i >= 0:
            tb = times[i, kb]
            tij = times[i, kj]
            if tij != _INF:
                rest_b = fs[2, b] if tb == fs[1, b] else fs[1, b]
                sum_b = fs[0, b] - tb
                for r in range(cnt):
                    t2b = g_tb[r]
                    if t2b < tb:  # the swap must shrink bin b's sum (necessary for any gain on b)
                        nb = (sum_b + t2b + pp_weight[b] * max(rest_b, t2b)) / speed[b]
                        if nb < best:
                            t2j = g_tj[r]
                            rest_j = rest_j2 if t2j == rest_j1 else rest_j1
                            nj = (fs[0, j] - t2j + tij + pp_weight[j] * max(rest_j, tij)) / speed[j]
                            if nj < best:
                                i2 = g_id[r]
                                if ist[0, b] - sizes[i] + sizes[i2] <= bin_capacity[b] and ist[0, j] - sizes[i2] + sizes[i] <= bin_capacity[j]:
                                    best = max(nb, nj)
                                    bi = i
                                    bk = i2
            i = nxt[i]
        if first and bi >= 0:
            break
    return bi, bk, best


@njit(cache=True)
def _best_split(b, j, times, bin_type, speed, pp_weight, sizes, bin_capacity, head, nxt, items, keys, suf_sum, suf_max, suf_tok):
    """Re-split the items of bins b and j (of different types) between the two.

    Items sorted by the time ratio ``(t_b / v_b) / (t_j / v_j)``; a prefix goes to b, the
    rest to j (the shape of the fractional optimum for two unrelated machines); the
    best cut is the one minimising the larger load. Fills ``items[:p]`` in sorted order
    and returns (p, cut, value of the best cut)."""
    kb = bin_type[b]
    kj = bin_type[j]
    p = 0
    for q in (b, j):
        i = head[q]
        while i >= 0:
            tb = times[i, kb] / speed[b]
            tj = times[i, kj] / speed[j]
            if tb == _INF:
                key = _INF
            elif tj == _INF:
                key = -_INF
            elif tj > 0.0:
                key = tb / tj
            elif tb > 0.0:
                key = _INF
            else:
                key = 1.0
            items[p] = i
            keys[p] = key
            p += 1
            i = nxt[i]
    perm = np.argsort(keys[:p], kind="mergesort")
    srt = items[:p][perm].copy()
    items[:p] = srt
    # suffix sums / maxima / tokens of the part that goes to j
    suf_sum[p] = 0.0
    suf_max[p] = 0.0
    suf_tok[p] = 0
    for r in range(p - 1, -1, -1):
        t = times[srt[r], kj]
        suf_sum[r] = suf_sum[r + 1] + t
        suf_max[r] = max(suf_max[r + 1], t)
        suf_tok[r] = suf_tok[r + 1] + sizes[srt[r]]
    best = _INF
    cut = -1
    pre_sum = 0.0
    pre_max = 0.0
    pre_tok = 0
    for c in range(p + 1):
        if c > 0:
            t = times[srt[c - 1], kb]
            if t == _INF:
                break
            pre_sum += t
            pre_max = max(pre_max, t)
            pre_tok += sizes[srt[c - 1]]
        if suf_sum[c] == _INF or pre_tok > bin_capacity[b] or suf_tok[c] > bin_capacity[j]:
            continue
        v = max((pre_sum + pp_weight[b] * pre_max) / speed[b], (suf_sum[c] + pp_weight[j] * suf_max[c]) / speed[j])
        if v < best:
            best = v
            cut = c
    return p, cut, best


@njit(cache=True)
def _improve_kernel(
    bin_of, require_nonempty, local_search, max_rounds, stats, times, bin_type, speed, pp_weight, sizes, bin_capacity,
    cls_of, cls_pos, cls_type, cls_cap, cls_ptr, cls_bins, cls_off, cls_leaves, tree_size,
):
    """Repair empty bins (when asked and n >= m), then move/swap local search on the
    bottleneck bin until no move or swap lowers it (or ``max_rounds``). Works in place
    on ``bin_of``; returns (rounds done, bins left empty)."""
    n = times.shape[0]
    m = bin_type.shape[0]
    head, nxt, prv, fs, ist, tval, tidx = _new_state(
        times, bin_type, speed, pp_weight, sizes, bin_of, cls_of, cls_pos, cls_off, cls_leaves, tree_size
    )
    keep_nonempty = require_nonempty and n >= m
    empty = 0
    if keep_nonempty:
        empty = _fill_empty_bins(times, bin_type, speed, pp_weight, sizes, bin_capacity, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves, cls_type, cls_cap)
    rounds = 0
    if not local_search:
        return rounds, empty
    items = np.empty(n, dtype=np.int64)  # scratch for _best_split
    keys = np.empty(n)
    suf_sum = np.empty(n + 1)
    suf_max = np.empty(n + 1)
    suf_tok = np.empty(n + 1, dtype=np.int64)
    num_cls = cls_type.shape[0]
    num_types = times.shape[1]
    type_root = np.empty(num_types, dtype=np.int64)
    split_partners = np.empty(num_types, dtype=np.int64)
    swap_partners = np.empty(_SWAP_PARTNERS, dtype=np.int64)
    chosen = np.zeros(num_cls, dtype=np.bool_)
    everyone = np.arange(m)
    per_type = np.zeros(num_types, dtype=np.int64)
    num_wide = 0
    while rounds < max_rounds:
        b = 0
        for j in range(1, m):
            if fs[3, j] > fs[3, b]:
                b = j
        if fs[3, b] <= 0.0:
            break
        rounds += 1
        # hide b from its class tree: class roots are then the least-loaded *other* bins
        cb = cls_of[b]
        _tree_set(tval, tidx, cls_off[cb], cls_leaves[cb], cls_pos[b], _INF, b)
        # split partners: the least-loaded other bin of every other type (one per type);
        # swap partners: the _SWAP_PARTNERS least-loaded class roots
        num_split = 0
        for k in range(num_types):
            type_root[k] = -1
        for c in range(num_cls):
            j = tidx[cls_off[c] + 1]
            k = cls_type[c]
            if j >= 0 and k != bin_type[b] and (type_root[k] < 0 or fs[3, j] < fs[3, type_root[k]]):
                type_root[k] = j
        for k in range(num_types):
            if type_root[k] >= 0:
                split_partners[num_split] = type_root[k]
                num_split += 1
        num_swap = 0
        chosen[:] = False
        for q in range(_SWAP_PARTNERS):
            pick = -1
            for c in range(num_cls):
                j = tidx[cls_off[c] + 1]
                if j >= 0 and not chosen[c] and (pick < 0 or fs[3, j] < fs[3, tidx[cls_off[pick] + 1]]):
                    pick = c
            if pick < 0:
                break
            chosen[pick] = True
            swap_partners[num_swap] = tidx[cls_off[pick] + 1]
            num_swap += 1
        # 1. move one item of b to the least-loaded bin of some class
        mi, mj, _ = _best_move(b, keep_nonempty, times, bin_type, speed, pp_weight, sizes, bin_capacity, head, nxt, fs, ist, tval, tidx, cls_type, cls_cap, cls_off, cls_ptr, cls_bins)
        _tree_set(tval, tidx, cls_off[cb], cls_leaves[cb], cls_pos[b], fs[3, b], b)
        if mi >= 0:
            _remove(mi, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
            _add(mi, mj, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
            stats[0] += 1
            continue
        # 2. re-split b with a class root of another type, 3. swap with a class root;
        #    only when both fail, try every bin (once, before giving up)
        done = False
        for wide in range(2):
            if wide == 1:
                # the _WIDE_PER_TYPE least-loaded bins of every type, most slack first
                by_load = np.argsort(fs[3])
                per_type[:] = 0
                num_wide = 0
                for q in range(m):
                    j = by_load[q]
                    if per_type[bin_type[j]] < _WIDE_PER_TYPE:
                        per_type[bin_type[j]] += 1
                        everyone[num_wide] = j
                        num_wide += 1
            cand = split_partners if wide == 0 else everyone
            num_cand = num_split if wide == 0 else num_wide
            limit = fs[3, b] * (1.0 - _MIN_GAIN)
            best_j = -1
            for q in range(num_cand):
                j = cand[q]
                if j == b or bin_type[j] == bin_type[b]:
                    continue
                p, cut, v = _best_split(b, j, times, bin_type, speed, pp_weight, sizes, bin_capacity, head, nxt, items, keys, suf_sum, suf_max, suf_tok)
                if cut >= 0 and v < limit and not (keep_nonempty and (cut == 0 or cut == p)):
                    limit = v
                    best_j = j
            if best_j >= 0:
                p, cut, v = _best_split(b, best_j, times, bin_type, speed, pp_weight, sizes, bin_capacity, head, nxt, items, keys, suf_sum, suf_max, suf_tok)
                for r in range(p):
                    _remove(items[r], times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
                for r in range(p):
                    _add(items[r], b if r < cut else best_j, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
                done = True
                stats[1 + 2 * wide] += 1
                break
            cand = swap_partners if wide == 0 else everyone
            num_cand = num_swap if wide == 0 else num_wide
            si, sk, _ = _best_swap(b, cand, num_cand, wide == 1, times, bin_type, speed, pp_weight, sizes, bin_capacity, head, nxt, fs, ist, items, keys, suf_sum)
            if si >= 0:
                j = bin_of[sk]
                _remove(si, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
                _remove(sk, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
                _add(si, j, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
                _add(sk, b, times, bin_type, speed, pp_weight, sizes, bin_of, head, nxt, prv, fs, ist, tval, tidx, cls_of, cls_pos, cls_off, cls_leaves)
                done = True
                stats[2 + 2 * wide] += 1
                break
        if not done:
            break
    return rounds, empty


# ----------------------------------------------------------------------------------------
# Python entry points


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchReport:
    """What :func:`improve` did (diagnostics for benchmarks and tests)."""

    rounds: int
    """Local-search rounds run (each lowers the bottleneck bin once, the last may fail)."""
    empty_bins: int
    """Bins left empty by the non-empty repair (eligibility allows no more)."""
    moves: int
    splits: int
    swaps: int
    wide_splits: int
    wide_swaps: int


class GreedyFailure(ValueError):
    """No greedy rule could place every item within the token capacities."""


def _tree_size(inst: Instance) -> int:
    return int((2 * inst.cls_leaves).sum())


def _cls_args(inst: Instance) -> tuple:
    return (
        inst.cls_of, inst.cls_pos, inst.cls_type, inst.cls_cap, inst.cls_ptr,
        inst.cls_bins, inst.cls_off, inst.cls_leaves, _tree_size(inst),
    )


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
       allowed types, least projected load (``"lp-lpt"``, rule 2 of the kernel);
    2. LPT by difficulty, least resulting load (``"lpt"``) — when rule 1 also succeeded,
       the one with the smaller makespan is kept (the LP split wins with many items per
       bin, plain LPT with few, where rounding the split per bin costs more);
    3. with token capacities: largest size first, least resulting load (``"lpt-by-size"``);
       then largest size first, best fit by tokens (``"best-fit"``).

    Returns (bin_of, rule name); raises :class:`GreedyFailure` when every rule fails.
    """
    ids = np.arange(inst.n)
    attempts = []
    if allowed is not None:
        guided = np.ascontiguousarray(np.where(allowed, inst.times, np.inf))
        attempts.append((np.lexsort((ids, -difficulty(inst, guided))), 2, "lp-lpt", guided))
    diff = difficulty(inst, inst.times)
    attempts.append((np.lexsort((ids, -diff)), 0, "lpt", inst.times))
    if inst.has_capacity:
        by_size = np.lexsort((ids, -diff, -inst.sizes))
        attempts += [(by_size, 0, "lpt-by-size", inst.times), (by_size, 1, "best-fit", inst.times)]
    failed = -1
    found: list[tuple[float, np.ndarray, str]] = []
    for order, rule, name, times in attempts:
        bin_of, failed = _greedy_kernel(
            order.astype(np.int64), rule, times, inst.bin_type, inst.speed, inst.pp_weight,
            inst.sizes, inst.bin_capacity, *_cls_args(inst),
        )
        if failed < 0:
            found.append((float(bin_loads(inst.times, inst.bin_type, inst.speed, inst.pp_weight, bin_of).max()), bin_of, name))
            if name != "lp-lpt":  # the LP-guided answer is compared with plain LPT, then stop
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


def improve(
    inst: Instance, bin_of: np.ndarray, *, require_nonempty: bool, local_search: bool, max_rounds: int
) -> tuple[np.ndarray, SearchReport]:
    """Non-empty repair + local search from ``bin_of`` (copied). Returns (bin_of, report)."""
    out = np.array(bin_of, dtype=np.int64, copy=True)
    stats = np.zeros(5, dtype=np.int64)  # accepted: moves, splits, swaps, wide splits, wide swaps
    rounds, empty = _improve_kernel(
        out, bool(require_nonempty), bool(local_search), int(max_rounds), stats, inst.times, inst.bin_type,
        inst.speed, inst.pp_weight, inst.sizes, inst.bin_capacity, *_cls_args(inst),
    )
    report = SearchReport(
        rounds=int(rounds), empty_bins=int(empty), moves=int(stats[0]), splits=int(stats[1]), swaps=int(stats[2]),
        wide_splits=int(stats[3]), wide_swaps=int(stats[4]),
    )
    return out, report
