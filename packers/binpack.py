"""Bin packing by tokens: first-fit decreasing, best-fit decreasing, next-fit.

Items (sequences of ``sizes[i]`` tokens) go into as few bins of ``capacity`` tokens as
the rule finds. Bins are numbered in the order they are opened.

* **first-fit decreasing** (FFD): items by decreasing size (ties: lower index first),
  each into the lowest-numbered bin with room. A max-tree over the residual capacity
  of ``n`` potential bins finds that bin in ``O(log n)``; total ``O(n log n)``.
  Guarantee: ``FFD <= 11/9·OPT + 6/9`` bins (Dósa 2007).
* **best-fit decreasing** (BFD): same order, each into the bin whose residual capacity
  is smallest among those with room (ties: the bin that reached that residual first, as
  TRL's ``pack_dataset`` and OLMo-core's ``InstancePacker`` break them). Bins are kept in
  buckets by residual capacity and a tree over the buckets finds the first non-empty
  bucket at or above the item's size in ``O(log B)``; with ``capacity < 2**20`` tokens
  every bucket holds a single residual value, so total ``O(n log C)``. Larger
  capacities share buckets (``2**shift`` residual values each) and scan the bucket
  found. Same ``11/9`` guarantee as FFD.
* **next-fit** (NF): items in the given order; one open bin, a new one when the next
  item does not fit. ``O(n)``, at most ``2·OPT - 1`` bins.

Decreasing order uses a counting sort when sizes are small (``max size <= 4n + 2**16``),
``numpy.argsort`` otherwise.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from packers.types import BinPacking
from packers.validate import as_capacity, as_sizes

__all__ = ["first_fit_decreasing", "first_fit_decreasing_groups", "best_fit_decreasing", "next_fit", "decreasing_order"]


@njit(cache=True, nogil=True)
def _counting_order_desc(sizes: np.ndarray, max_size: int) -> np.ndarray:
    """Stable order of decreasing size (ties by increasing index) by counting sort."""
    n = sizes.shape[0]
    count = np.zeros(max_size + 2, dtype=np.int64)
    for i in range(n):
        count[max_size - sizes[i] + 1] += 1  # bucket 0 = largest size
    for v in range(1, max_size + 2):
        count[v] += count[v - 1]
    order = np.empty(n, dtype=np.int64)
    for i in range(n):
        b = max_size - sizes[i]
        order[count[b]] = i
        count[b] += 1
    return order


def decreasing_order(sizes: np.ndarray) -> np.ndarray:
    """Indices of ``sizes`` (int64, >= 1) by decreasing size, ties by increasing index."""
    max_size = int(sizes.max())
    if max_size <= 4 * sizes.shape[0] + (1 << 16):
        return _counting_order_desc(sizes, max_size)
    return np.argsort(-sizes, kind="stable")


@njit(cache=True, nogil=True)
def _first_fit(order: np.ndarray, sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    n = order.shape[0]
    leaves = 1
    while leaves < n:
        leaves *= 2
    tree = np.empty(2 * leaves, dtype=np.int64)
    bin_of = np.empty(n, dtype=np.int64)
    num_bins = _first_fit_into(order, sizes, capacity, tree, bin_of)
    return bin_of, num_bins


@njit(cache=True, nogil=True)
def _first_fit_into(order: np.ndarray, sizes: np.ndarray, capacity: int, tree: np.ndarray, bin_of: np.ndarray) -> int:
    """First fit of the items ``order`` (in that order) into bins of ``capacity``; writes
    ``bin_of[i]`` for those items and returns the number of bins. ``tree`` is scratch of at
    least ``2·leaves`` entries (``leaves`` = ``len(order)`` rounded up to a power of two)."""
    n = order.shape[0]
    leaves = 1
    while leaves < n:
        leaves *= 2
    # tree[node] = largest residual capacity (tokens) among the bins under node;
    # leaf p is bin p, all start empty, so the lowest empty bin is the next one to open.
    tree[: 2 * leaves] = capacity
    num_bins = 0
    for r in range(n):
        i = order[r]
        s = sizes[i]
        node = 1
        while node < leaves:  # descend to the leftmost leaf with residual >= s
            node = 2 * node if tree[2 * node] >= s else 2 * node + 1
        p = node - leaves
        bin_of[i] = p
        if p >= num_bins:
            num_bins = p + 1
        tree[node] -= s
        node >>= 1
        while node >= 1:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:
                break
            tree[node] = best
            node >>= 1
    return num_bins


@njit(cache=True, nogil=True)
def _first_fit_groups(order: np.ndarray, group: np.ndarray, sizes: np.ndarray, capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First-fit decreasing inside every group: ``order`` is the decreasing order of all
    items; a stable counting sort by ``group`` keeps it inside each group. Items with
    group -1 are skipped. Returns (bin within the group or -1, bins per group)."""
    n = order.shape[0]
    num_groups = capacity.shape[0]
    start = np.zeros(num_groups + 1, dtype=np.int64)
    for i in range(n):
        if group[i] >= 0:
            start[group[i] + 1] += 1
    largest = 0
    for g in range(num_groups):
        largest = max(largest, start[g + 1])
        start[g + 1] += start[g]
    grouped = np.empty(start[num_groups], dtype=np.int64)
    fill = start[:num_groups].copy()
    for r in range(n):
        i = order[r]
        g = group[i]
        if g >= 0:
            grouped[fill[g]] = i
            fill[g] += 1
    leaves = 1
    while leaves < largest:
        leaves *= 2
    tree = np.empty(2 * leaves, dtype=np.int64)
    bin_of = np.full(n, -1, dtype=np.int64)
    num_bins = np.zeros(num_groups, dtype=np.int64)
    for g in range(num_groups):
        if start[g + 1] > start[g]:
            num_bins[g] = _first_fit_into(grouped[start[g] : start[g + 1]], sizes, capacity[g], tree, bin_of)
    return bin_of, num_bins


@njit(cache=True, nogil=True)
def _best_fit(order: np.ndarray, sizes: np.ndarray, capacity: int, shift: int) -> tuple[np.ndarray, int]:
    n = order.shape[0]
    num_buckets = (capacity >> shift) + 1
    leaves = 1
    while leaves < num_buckets:
        leaves *= 2
    # nonempty[node] = number of non-empty buckets under node; bucket b holds the bins
    # whose residual capacity r has r >> shift == b, in a doubly linked list in the order
    # they entered it (a bin re-enters on every placement), so the first bin of a bucket
    # with the best residual is the one that reached it first (the FIFO tie rule).
    nonempty = np.zeros(2 * leaves, dtype=np.int32)
    head = np.full(num_buckets, -1, dtype=np.int64)
    tail = np.full(num_buckets, -1, dtype=np.int64)
    nxt = np.full(n, -1, dtype=np.int64)
    prv = np.full(n, -1, dtype=np.int64)
    residual = np.zeros(n, dtype=np.int64)
    bin_of = np.empty(n, dtype=np.int64)
    num_bins = 0
    for r in range(n):
        i = order[r]
        s = sizes[i]
        chosen = -1
        b = s >> shift
        # the bucket of s itself may hold bins with residual < s: scan it for the best fit
        if b < num_buckets and head[b] >= 0:
            best = capacity + 1
            q = head[b]
            while q >= 0:
                if residual[q] >= s and residual[q] < best:
                    best = residual[q]
                    chosen = q
                q = nxt[q]
        if chosen < 0 and b + 1 < num_buckets:
            # first non-empty bucket above b: every bin in it fits; take its smallest residual
            node = leaves + b + 1
            found = -1
            if nonempty[node] > 0:
                found = node
            else:
                # climb until a right sibling subtree has a non-empty bucket, then descend left-most
                while node > 1:
                    if node % 2 == 0 and nonempty[node + 1] > 0:
                        found = node + 1
                        break
                    node >>= 1
                if found > 0:
                    while found < leaves:
                        found = 2 * found if nonempty[2 * found] > 0 else 2 * found + 1
            if found > 0:
                bk = found - leaves
                best = capacity + 1
                q = head[bk]
                while q >= 0:
                    if residual[q] < best:
                        best = residual[q]
                        chosen = q
                    q = nxt[q]
        if chosen < 0:
            chosen = num_bins
            num_bins += 1
            residual[chosen] = capacity
        else:
            # unlink chosen from its bucket
            bk = residual[chosen] >> shift
            if prv[chosen] >= 0:
                nxt[prv[chosen]] = nxt[chosen]
            else:
                head[bk] = nxt[chosen]
            if nxt[chosen] >= 0:
                prv[nxt[chosen]] = prv[chosen]
            else:
                tail[bk] = prv[chosen]
            if head[bk] < 0:
                node = leaves + bk
                while node >= 1:
                    nonempty[node] -= 1
                    node >>= 1
        bin_of[i] = chosen
        residual[chosen] -= s
        # link chosen at the tail of its new bucket
        bk = residual[chosen] >> shift
        was_empty = head[bk] < 0
        nxt[chosen] = -1
        prv[chosen] = tail[bk]
        if was_empty:
            head[bk] = chosen
        else:
            nxt[tail[bk]] = chosen
        tail[bk] = chosen
        if was_empty:
            node = leaves + bk
            while node >= 1:
                nonempty[node] += 1
                node >>= 1
    return bin_of, num_bins


@njit(cache=True, nogil=True)
def _next_fit(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    n = sizes.shape[0]
    bin_of = np.empty(n, dtype=np.int64)
    current = 0
    used = 0
    for i in range(n):
        if used + sizes[i] > capacity:
            current += 1
            used = 0
        bin_of[i] = current
        used += sizes[i]
    return bin_of, current + 1


def _checked(sizes: object, capacity: object) -> tuple[np.ndarray, int]:
    arr = as_sizes(sizes)
    cap = as_capacity(capacity)
    big = np.flatnonzero(arr > cap)
    if big.size:
        i = int(big[0])
        raise ValueError(
            f"item {i} has {int(arr[i])} tokens, above the capacity {cap}; raise the capacity or split/truncate the item"
        )
    return arr, cap


def _result(sizes: np.ndarray, capacity: int, bin_of: np.ndarray, num_bins: int, solver: str) -> BinPacking:
    loads = np.bincount(bin_of, weights=sizes, minlength=num_bins).astype(np.int64)
    return BinPacking(bin_of=bin_of, num_bins=int(num_bins), loads=loads, capacity=capacity, solver=solver)


def first_fit_decreasing(sizes: np.ndarray, capacity: int) -> BinPacking:
    """Pack items of ``sizes`` tokens into bins of ``capacity`` tokens by first-fit decreasing.

    Raises ``ValueError`` for an empty input, a size < 1, or an item above ``capacity``.
    """
    arr, cap = _checked(sizes, capacity)
    bin_of, num_bins = _first_fit(decreasing_order(arr), arr, cap)
    return _result(arr, cap, bin_of, num_bins, "ffd")


def first_fit_decreasing_groups(
    sizes: np.ndarray, group: np.ndarray, capacity: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`first_fit_decreasing` on many independent groups of items in one call.

    Item ``i`` (``sizes[i]`` tokens) belongs to group ``group[i]`` (``-1``: not packed);
    group ``g`` packs into bins of ``capacity[g]`` tokens. Inside every group the answer
    is exactly :func:`first_fit_decreasing` on that group's items taken in index order
    (decreasing size, ties by index). One sort of all items and one numba call replace a
    Python loop over groups (stage 2 packs every replica of a strategy at once).

    Returns ``(bin_of, num_bins)``: int64[n] bin of every item *within its group* (-1 for
    items not packed) and int64[G] bins used per group (0 for an empty group).

    Raises ``ValueError`` for a size < 1, a group outside ``-1 .. G−1``, a capacity < 1,
    or an item above its group's capacity.
    """
    arr = as_sizes(sizes)
    grp = np.asarray(group)
    cap = np.asarray(capacity)
    if grp.shape != arr.shape or grp.dtype.kind not in "iu":
        raise ValueError(f"group must be {arr.shape[0]} integers (one per item), got shape {grp.shape}, dtype {grp.dtype}")
    if cap.ndim != 1 or cap.dtype.kind not in "iu":
        raise ValueError(f"capacity must be a 1-D integer array (tokens per group), got shape {cap.shape}, dtype {cap.dtype}")
    grp = grp.astype(np.int64, copy=False)
    cap = cap.astype(np.int64, copy=False)
    bad = np.flatnonzero((grp < -1) | (grp >= cap.shape[0]))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"group[{i}] = {int(grp[i])}; groups run from 0 to {cap.shape[0] - 1} (-1: not packed)")
    if cap.size and int(cap.min()) < 1:
        g = int(np.argmin(cap))
        raise ValueError(f"capacity[{g}] = {int(cap[g])} tokens; a bin must hold at least 1 token")
    packed = grp >= 0
    big = np.flatnonzero(packed & (arr > cap[np.where(packed, grp, 0)])) if cap.size else np.zeros(0, dtype=np.int64)
    if big.size:
        i = int(big[0])
        raise ValueError(
            f"item {i} has {int(arr[i])} tokens, above its group's capacity {int(cap[grp[i]])}; "
            "raise the capacity or split/truncate the item"
        )
    return _first_fit_groups(decreasing_order(arr), grp, arr, cap)


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> BinPacking:
    """Pack items of ``sizes`` tokens into bins of ``capacity`` tokens by best-fit decreasing.

    Raises ``ValueError`` for an empty input, a size < 1, or an item above ``capacity``.
    """
    arr, cap = _checked(sizes, capacity)
    shift = max(0, int(cap).bit_length() - 20)  # at most ~2**20 residual buckets
    bin_of, num_bins = _best_fit(decreasing_order(arr), arr, cap, shift)
    return _result(arr, cap, bin_of, num_bins, "bfd")


def next_fit(sizes: np.ndarray, capacity: int) -> BinPacking:
    """Pack items in the given order: keep one open bin, open a new one when an item does not fit.

    Raises ``ValueError`` for an empty input, a size < 1, or an item above ``capacity``.
    """
    arr, cap = _checked(sizes, capacity)
    bin_of, num_bins = _next_fit(arr, cap)
    return _result(arr, cap, bin_of, num_bins, "next_fit")
