"""Non-empty repair and local search for the assignment problems (see :mod:`packers._state`).

:func:`improve` first gives every empty bin an item where eligibility allows (augmenting
paths), then repeatedly lowers the bottleneck bin by a move, a split with a bin of
another type, or a swap (:func:`_improve_kernel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from packers._state import Instance, _add, _class_pick, _new_state, _remove, _tree_set, cls_args

__all__ = ["SearchReport", "improve"]

_INF = np.inf
_MIN_GAIN = 1e-4  # a step must lower the bottleneck bin by this fraction of its load
_SWAP_PARTNERS = 4  # narrow phase: swaps with the 4 least-loaded class roots
_WIDE_PER_TYPE = 16  # wide phase (only when the narrow one fails): the 16 least-loaded bins of every type


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def _best_swap(b, partners, num_partners, first, times, bin_type, speed, pp_weight, sizes, bin_capacity, head, nxt, fs, ist, g_id, g_tb, g_tj):
    """Best exchange of an item of bin b with an item of a partner bin: (item in b, other
    item, value). Partners are scanned in the given order; with ``first``, stop after the
    first partner that offers an improving swap (its best one).

    The answer is that of scanning every pair (items of b in list order, the partner's
    items in list order) and keeping each strict improvement of ``max(new load of b, new
    load of the partner)``: the smallest value, ties to the first pair in that order. The
    pairs are not all scanned: a partner's items (gathered into the scratch arrays ``g_*``)
    are sorted by their time ``x`` on b's type; b's new load grows with ``x`` (so the
    improving swaps of an item of b have ``x`` below a cut found by binary search), and
    when the partner has no pipeline weight and its own times rise along that order (b's
    type, or any type whose costs grow with length) its new load falls along it (a second
    cut from below). Only the window between the cuts is evaluated, with the same
    formulas; ties inside it go to the lowest list position."""
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
        if cnt == 0:
            continue
        perm = np.argsort(g_tb[:cnt], kind="mergesort")
        xs = np.empty(cnt)
        ys = np.empty(cnt)
        for p in range(cnt):
            xs[p] = g_tb[perm[p]]
            ys[p] = g_tj[perm[p]]
        rest_j1 = fs[1, j]
        rest_j2 = fs[2, j]
        # the partner's new load falls along the sorted order when it has no pipeline term
        # and its own times rise with x (always for b's type; for another type when longer
        # sequences are slower on both, as with a·s² + b·s costs)
        falls = pp_weight[j] == 0.0
        for p in range(1, cnt):
            if ys[p] < ys[p - 1]:
                falls = False
                break
        i = head[b]
        while i >= 0:
            tb = times[i, kb]
            tij = times[i, kj]
            if tij != _INF:
                rest_b = fs[2, b] if tb == fs[1, b] else fs[1, b]
                sum_b = fs[0, b] - tb
                # hi: first position where "x < tb and b's new load < best" fails
                lo = 0
                hi = cnt
                while lo < hi:
                    mid = (lo + hi) >> 1
                    x = xs[mid]
                    if x < tb and (sum_b + x + pp_weight[b] * max(rest_b, x)) / speed[b] < best:
                        lo = mid + 1
                    else:
                        hi = mid
                hi = lo
                lo = 0
                if falls:
                    # lo: first position where the partner's new load is below best
                    top = hi
                    while lo < top:
                        mid = (lo + top) >> 1
                        y = ys[mid]
                        if (fs[0, j] - y + tij + pp_weight[j] * max(rest_j1, tij)) / speed[j] < best:
                            top = mid
                        else:
                            lo = mid + 1
                found_v = best
                found_r = -1
                for p in range(lo, hi):
                    r = perm[p]
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
                                    v = max(nb, nj)
                                    if v < found_v or (v == found_v and found_r >= 0 and r < found_r):
                                        found_v = v
                                        found_r = r
                if found_r >= 0:
                    best = found_v
                    bi = i
                    bk = g_id[found_r]
            i = nxt[i]
        if first and bi >= 0:
            break
    return bi, bk, best


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def _improve_kernel(
    bin_of, require_nonempty, local_search, max_rounds, stats, times, bin_type, speed, pp_weight, sizes, bin_capacity,
    cls_of, cls_pos, cls_type, cls_cap, cls_ptr, cls_bins, cls_off, cls_leaves, tree_size,
):
    """Repair empty bins (when asked and n >= m), then local search on the bottleneck bin:
    a move, else a split with a bin of another type, else a swap (narrow partners, then
    wide), until none lowers it by ``_MIN_GAIN`` or ``max_rounds``. Works in place on
    ``bin_of``; counts accepted steps in ``stats``; returns (rounds, bins left empty)."""
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
        for _ in range(_SWAP_PARTNERS):
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




def improve(
    inst: Instance, bin_of: np.ndarray, *, require_nonempty: bool, local_search: bool, max_rounds: int
) -> tuple[np.ndarray, SearchReport]:
    """Non-empty repair + local search from ``bin_of`` (copied). Returns (bin_of, report)."""
    out = np.array(bin_of, dtype=np.int64, copy=True)
    stats = np.zeros(5, dtype=np.int64)  # accepted: moves, splits, swaps, wide splits, wide swaps
    rounds, empty = _improve_kernel(
        out, bool(require_nonempty), bool(local_search), int(max_rounds), stats, inst.times, inst.bin_type,
        inst.speed, inst.pp_weight, inst.sizes, inst.bin_capacity, *cls_args(inst),
    )
    report = SearchReport(
        rounds=int(rounds), empty_bins=int(empty), moves=int(stats[0]), splits=int(stats[1]), swaps=int(stats[2]),
        wide_splits=int(stats[3]), wide_swaps=int(stats[4]),
    )
    return out, report
