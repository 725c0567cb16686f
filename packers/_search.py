"""Non-empty repair and local search for the assignment problems (see :mod:`packers._state`).

:func:`improve` first gives every empty bin an item where eligibility allows (augmenting
paths), then repeatedly lowers the bottleneck bin by a move, a split with a bin of
another type, or a swap (:func:`_improve_kernel`; the moves are evaluated in
:mod:`packers._moves`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from packers._moves import _MIN_GAIN, _best_move, _best_split, _best_swap
from packers._state import Instance, _add, _new_state, _remove, _tree_set, cls_args

__all__ = ["SearchReport", "improve"]

_INF = np.inf
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
