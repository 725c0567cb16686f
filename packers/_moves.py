"""Local-search moves on one bottleneck bin (evaluated, not applied; see :mod:`packers._search`).

Each function scans the state of :mod:`packers._state` and returns the best step it
finds that lowers the bottleneck bin ``b`` by at least ``_MIN_GAIN`` of its load:
:func:`_best_move` (one item to another bin), :func:`_best_swap` (an item of ``b`` for an
item of a partner bin) and :func:`_best_split` (the items of ``b`` and a bin of another
type re-split between the two). The driver, :func:`packers._search._improve_kernel`,
applies the step.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from packers._state import _class_pick

_INF = np.inf
_MIN_GAIN = 1e-4  # a step must lower the bottleneck bin by this fraction of its load


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
