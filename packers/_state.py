"""Instance and per-bin state shared by the assignment kernels (makespan and min-max).

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

__all__ = ["Instance", "build_instance", "bin_loads", "cls_args"]

_INF = np.inf


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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True)
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




def tree_size(inst: Instance) -> int:
    return int((2 * inst.cls_leaves).sum())


def cls_args(inst: Instance) -> tuple:
    return (
        inst.cls_of, inst.cls_pos, inst.cls_type, inst.cls_cap, inst.cls_ptr,
        inst.cls_bins, inst.cls_off, inst.cls_leaves, tree_size(inst),
    )
