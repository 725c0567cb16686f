"""k-way number partitioning by the Karmarkar–Karp largest differencing method (LDM).

A *k-tuple* is a partial solution: k subsets with their sums, kept sorted by
decreasing sum; its *spread* is largest − smallest sum. Start with one tuple per item
(the item alone in the first subset). Repeatedly take the two tuples with the largest
spreads and combine them by pairing the largest subset of one with the smallest of the
other (``c_r = a_r + b_{k-1-r}``), re-sort, and put the result back. The last tuple is
the partition. Cost ``O(n·k log k + n log n)`` time and ``O(n·k)`` memory.

``equal_counts=True`` gives a balanced partition (subset sizes differ by at most one):
items sorted by decreasing value are cut into consecutive chunks of k; each chunk is a
tuple with one item per subset (the last chunk's missing items are empty subsets with
sum 0). Combining tuples keeps "one subset from every chunk" per final subset, so
every subset gets one item from each full chunk and at most one from the last.

The answer is a heuristic; ``bound = max(max value, Σ values / k)`` is reported (valid
for both variants: the balanced optimum is never below the unconstrained one); with
``equal_counts`` also the largest value plus the ``n // k − 1`` smallest others (its bin
holds at least ``n // k`` items).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from packers.types import Assignment
from packers.validate import as_num_bins, as_values

__all__ = ["karmarkar_karp"]


@njit(cache=True)
def _before(k1, i1, k2, i2):
    """Heap order: larger spread first, ties by smaller id."""
    return k1 > k2 or (k1 == k2 and i1 < i2)


@njit(cache=True)
def _push(hkey, hid, size, key, ident):
    pos = size
    hkey[pos] = key
    hid[pos] = ident
    while pos > 0:
        up = (pos - 1) // 2
        if _before(hkey[pos], hid[pos], hkey[up], hid[up]):
            hkey[pos], hkey[up] = hkey[up], hkey[pos]
            hid[pos], hid[up] = hid[up], hid[pos]
            pos = up
        else:
            break
    return size + 1


@njit(cache=True)
def _pop(hkey, hid, size):
    ident = hid[0]
    size -= 1
    hkey[0] = hkey[size]
    hid[0] = hid[size]
    pos = 0
    while True:
        left = 2 * pos + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and _before(hkey[left + 1], hid[left + 1], hkey[left], hid[left]):
            child = left + 1
        if _before(hkey[child], hid[child], hkey[pos], hid[pos]):
            hkey[pos], hkey[child] = hkey[child], hkey[pos]
            hid[pos], hid[child] = hid[child], hid[pos]
            pos = child
        else:
            break
    return ident, size


@njit(cache=True)
def _ldm(values: np.ndarray, order: np.ndarray, k: int, equal_counts: bool) -> np.ndarray:
    """Largest differencing method; ``order`` = items by decreasing value. Returns bin_of."""
    n = values.shape[0]
    num_chunks = (n + k - 1) // k
    pool = num_chunks if equal_counts else n // 2 + 2
    # tuple slot t: sums[t, r] = sum of subset r (sorted decreasing); its items form the
    # linked list head[t, r] → nxt[...] → ... → tail[t, r]
    sums = np.zeros((pool, k))
    head = np.full((pool, k), -1, dtype=np.int64)
    tail = np.full((pool, k), -1, dtype=np.int64)
    nxt = np.full(n, -1, dtype=np.int64)
    free = np.empty(pool, dtype=np.int64)
    num_free = 0
    hkey = np.empty(n + 1)
    hid = np.empty(n + 1, dtype=np.int64)
    size = 0
    # heap ids: t >= 0 is pool slot t; -(i+1) is the not yet materialised singleton item i
    if equal_counts:
        for c in range(num_chunks):
            for r in range(k):
                p = c * k + r
                if p < n:
                    i = order[p]
                    sums[c, r] = values[i]
                    head[c, r] = i
                    tail[c, r] = i
            size = _push(hkey, hid, size, sums[c, 0] - sums[c, k - 1], c)
    else:
        for t in range(pool - 1, -1, -1):
            free[num_free] = t
            num_free += 1
        for p in range(n):
            i = order[p]
            size = _push(hkey, hid, size, values[i], -(i + 1))
    a_sums = np.empty(k)
    a_head = np.empty(k, dtype=np.int64)
    a_tail = np.empty(k, dtype=np.int64)
    while size > 1:
        a, size = _pop(hkey, hid, size)
        b, size = _pop(hkey, hid, size)
        for ident in (a, b):  # materialise singletons: (v, 0, ..., 0)
            if ident < 0:
                i = -ident - 1
                num_free -= 1
                t = free[num_free]
                sums[t, :] = 0.0
                head[t, :] = -1
                tail[t, :] = -1
                sums[t, 0] = values[i]
                head[t, 0] = i
                tail[t, 0] = i
                if ident == a:
                    a = t
                else:
                    b = t
        for r in range(k):  # pair a's r-th largest with b's r-th smallest
            q = k - 1 - r
            a_sums[r] = sums[a, r] + sums[b, q]
            if head[a, r] < 0:
                a_head[r] = head[b, q]
                a_tail[r] = tail[b, q]
            else:
                a_head[r] = head[a, r]
                a_tail[r] = tail[a, r]
                if head[b, q] >= 0:
                    nxt[tail[a, r]] = head[b, q]
                    a_tail[r] = tail[b, q]
        perm = np.argsort(-a_sums, kind="mergesort")
        for r in range(k):
            sums[a, r] = a_sums[perm[r]]
            head[a, r] = a_head[perm[r]]
            tail[a, r] = a_tail[perm[r]]
        free[num_free] = b
        num_free += 1
        size = _push(hkey, hid, size, sums[a, 0] - sums[a, k - 1], a)
    last, size = _pop(hkey, hid, size)
    bin_of = np.zeros(n, dtype=np.int64)
    if last < 0:  # a single item and nothing to combine
        return bin_of
    for r in range(k):
        i = head[last, r]
        while i >= 0:
            bin_of[i] = r
            i = nxt[i]
    return bin_of


def karmarkar_karp(values: np.ndarray, k: int, equal_counts: bool = False) -> Assignment:
    """Split items into ``k`` subsets with near-equal sums (largest differencing method).

    Args:
        values: float64[n] non-negative item weights (e.g. seconds or tokens).
        k: number of subsets (>= 1); subsets may be empty when ``n < k``.
        equal_counts: make subset sizes differ by at most one.

    Returns:
        :class:`Assignment` with ``loads`` = subset sums, ``solver`` ``"karmarkar_karp"``
        (or ``"karmarkar_karp:equal_counts"``) and a valid lower ``bound`` (module docstring).

    Raises:
        ValueError: empty input, a negative or non-finite value (naming its index), k < 1.
    """
    v = as_values(values)
    kk = as_num_bins(k, name="k")
    order = np.argsort(-v, kind="stable").astype(np.int64)
    bin_of = _ldm(v, order, kk, bool(equal_counts))
    loads = np.bincount(bin_of, weights=v, minlength=kk).astype(np.float64)
    bound = max(float(v.max()), float(v.sum()) / kk)
    per_bin = v.shape[0] // kk
    if equal_counts and per_bin > 1:
        # the bin holding the largest item holds >= n // k items: it and the smallest others
        rest = np.sort(v[order[1:]])
        bound = max(bound, float(v[order[0]]) + float(rest[: per_bin - 1].sum()))
    return Assignment(
        bin_of=bin_of,
        loads=loads,
        makespan=float(loads.max()),
        solver="karmarkar_karp:equal_counts" if equal_counts else "karmarkar_karp",
        bound=bound,
    )
