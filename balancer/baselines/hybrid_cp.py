"""Megatron-Core's hybrid context-parallel schedule (``BalancedCPScheduler``), re-implemented.

megatron-core 0.16.1 (``megatron/core/pipeline_parallel/hybrid_cp_schedule.py``) treats the
``dp × cp`` GPUs of a static layout as one pool and, per global batch, forms *rounds*
(micro-batches): in each round every sequence runs on a group of ``g`` GPUs (a power of
two), and every GPU belongs to one group. This module reproduces the schedule exactly,
quirks included, so the ``megatron_hybrid_cp`` baseline places sequences where Megatron
would (``tests/fixtures/baselines/megatron_core_hybrid_cp.json`` holds Megatron's own
answers). In our words:

* ``gpus_needed(L) = max(1, 2^⌈log2(L / max_seq_len_per_rank)⌉)``; a sequence's workload
  estimate is ``L² / gpus_needed(L)`` (per GPU of its group).
* Sequences are sorted longest first (stable) and scheduled round by round; what a
  round leaves over starts the next one, in the order it was left.
* A round cuts its sequences into buckets, as many as there are distinct group sizes,
  closing a bucket when it would pass 1.1 × the mean bucket work or when the remaining
  sequences are needed to give the later buckets one each (with Megatron's off-by-one:
  the reserve is counted as ``k − 2·closed``).
* It then takes, repeatedly, the first sequence at the head of a bucket that can be
  placed (a group of its size exists, or enough GPUs are still free) and puts it on the
  existing group of that size whose busiest GPU is least loaded — or on a new group of
  the least-loaded free GPUs when that group's busiest GPU is less loaded still.
* Once a sequence needing fewer GPUs than the round's first one has been placed, the
  round ends as soon as all GPUs are within 5 % of the busiest (while sequences remain).
* Then the busiest group's last sequence goes back to the left-overs while that lowers
  the spread (never below one sequence per GPU, never while a GPU is idle).
* Idle GPUs are filled by doubling the smallest group (the first such group), shifting
  the groups after it: the expanded group keeps only the sequences of its last GPU, and
  the GPUs between it and the first idle GPU move up. Repeated until no GPU is idle.

There is no token cap in a round: a GPU may hold any number of sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .rules import PeerRefusal

__all__ = ["CpRound", "balanced_cp_rounds", "gpus_needed"]


def gpus_needed(length: int, max_seq_len_per_rank: int) -> int:
    """GPUs Megatron gives a ``length``-token sequence: the next power of two of ``length / max``."""
    return max(1, 2 ** math.ceil(math.log2(length / max_seq_len_per_rank)))


@dataclass(frozen=True, slots=True)
class CpRound:
    """One micro-batch of the hybrid-cp schedule."""

    groups: tuple[tuple[int, ...], ...]
    """GPU indices of every group, groups in GPU order (they tile ``0 .. num_gpus-1``)."""
    positions: tuple[tuple[int, ...], ...]
    """Per group, the positions (into the batch) of its sequences, in placement order."""

    def per_gpu(self, num_gpus: int) -> list[list[int]]:
        """Positions every GPU runs (a sequence is listed on each GPU of its group)."""
        out: list[list[int]] = [[] for _ in range(num_gpus)]
        for gpus, pos in zip(self.groups, self.positions):
            for g in gpus:
                out[g] = list(pos)
        return out


class _Round:
    """Mutable state of one round, kept per group (every GPU of a group carries the same
    sequences and load; GPUs outside any group carry none and load 0).

    Megatron takes new groups from the free GPUs sorted by load; free GPUs all have load
    0, so that is the lowest free indices, and the groups tile a prefix of the GPUs in
    creation order.
    """

    def __init__(self, num_gpus: int) -> None:
        self.n = num_gpus
        self.used = 0  # GPUs 0 .. used-1 are in groups
        self.size: list[int] = []  # group id → GPUs, ids in creation (= GPU) order
        self.start: list[int] = []
        self.load: list[float] = []
        self.seqs: list[list[tuple[int, int]]] = []  # (position, length), placement order
        self.by_size: dict[int, list[int]] = {}

    def can_place(self, need: int) -> bool:
        return need in self.by_size or self.n - self.used >= need

    def place(self, item: tuple[int, int], need: int, work: float) -> None:
        best, best_load = -1, math.inf
        for gid in self.by_size.get(need, ()):  # least-loaded group of that size; the first on ties
            if self.load[gid] < best_load:
                best, best_load = gid, self.load[gid]
        if self.n - self.used >= need and 0.0 < best_load:  # a new group's load is 0
            best = len(self.size)
            self.size.append(need)
            self.start.append(self.used)
            self.load.append(0.0)
            self.seqs.append([])
            self.by_size.setdefault(need, []).append(best)
            self.used += need
        self.seqs[best].append(item)
        self.load[best] += work

    def extremes(self) -> tuple[float, float]:
        """Largest and smallest GPU load."""
        top = max(self.load, default=0.0)
        low = 0.0 if self.used < self.n else min(self.load)
        return max(top, 0.0), low


def _buckets(items: list[tuple[int, int]], need: list[int], work: list[float]) -> list[list[int]]:
    """Indices into ``items`` cut into as many buckets as distinct group sizes."""
    k = len(set(need))
    target = sum(work) / k
    buckets: list[list[int]] = []
    cur: list[int] = []
    cur_work = 0.0
    reserve = k
    for i in range(len(items)):
        if cur and (cur_work + work[i] > target * 1.1 or len(items) - i <= reserve - len(buckets)):
            buckets.append(cur)
            cur, cur_work = [], 0.0
            reserve -= 1
        cur.append(i)
        cur_work += work[i]
    if cur:
        buckets.append(cur)
    return buckets


def _trim(rnd: _Round, left: list[tuple[int, int]], msl: int, delta: float) -> None:
    """Return the busiest group's last sequence while that lowers the spread."""
    while True:
        top, low = rnd.extremes()
        if top - low <= delta * top or low == 0:
            return
        gid = rnd.load.index(top)  # the busiest GPU with the lowest index is in the first such group
        if len(rnd.seqs[gid]) <= 1:
            return
        pos, length = rnd.seqs[gid][-1]
        work = length * length / gpus_needed(length, msl)
        after = list(rnd.load)
        after[gid] -= work
        if max(after) - min(after) >= top - low:
            return
        rnd.seqs[gid].pop()
        rnd.load[gid] -= work
        left.append((pos, length))


def _fill_idle(rnd: _Round, num_gpus: int) -> None:
    """Double the first smallest group until no GPU is idle, shifting the groups after it.

    The GPUs between the grown group and the first idle GPU keep their sequences, moved up;
    the grown group keeps the sequences of its last GPU (all its GPUs carry the same).
    """
    while rnd.used < num_gpus:
        smallest = min(rnd.size)
        grown = min(2 * smallest, num_gpus)
        extra = grown - smallest
        if num_gpus - rnd.used < extra:  # Megatron indexes past its GPU list here (IndexError)
            raise PeerRefusal(
                f"Megatron's hybrid-cp schedule cannot fill {num_gpus - rnd.used} idle GPUs by doubling a "
                f"{smallest}-GPU group (it fails on this batch); use a power-of-two dp×cp pool"
            )
        gid = rnd.size.index(smallest)
        rnd.by_size[smallest].remove(gid)
        rnd.by_size.setdefault(grown, []).append(gid)
        rnd.size[gid] = grown
        for later in range(gid + 1, len(rnd.size)):
            rnd.start[later] += extra
        rnd.used += extra


def _one_round(items: list[tuple[int, int]], msl: int, num_gpus: int, delta: float) -> tuple[_Round, list[tuple[int, int]]]:
    need = [gpus_needed(length, msl) for _, length in items]
    work = [length * length / n for (_, length), n in zip(items, need)]
    buckets = [list(b) for b in _buckets(items, need, work)]
    rnd = _Round(num_gpus)
    first_need = None
    check = False
    while buckets:
        pick = None
        for b, bucket in enumerate(buckets):
            if not bucket:
                continue
            i = bucket[0]
            if rnd.can_place(need[i]):
                pick = b
                break
        if pick is None:
            break
        i = buckets[pick].pop(0)
        if first_need is None:
            first_need = need[i]
        rnd.place(items[i], need[i], work[i])
        while buckets and not buckets[0]:
            buckets.pop(0)
        if need[i] < first_need:
            check = True
        if check and buckets:
            top, low = rnd.extremes()
            if top - low <= delta * top:
                break
    left = [items[i] for bucket in buckets for i in bucket]
    _trim(rnd, left, msl, delta)
    _fill_idle(rnd, num_gpus)
    return rnd, left


def balanced_cp_rounds(
    lengths: np.ndarray, max_seq_len_per_rank: int, num_gpus: int, *, delta: float = 0.05
) -> list[CpRound]:
    """Megatron's hybrid-cp rounds for one global batch (``lengths`` in tokens, batch order).

    ``max_seq_len_per_rank`` is Megatron's ``max_seqlen_per_dp_cp_rank`` (tokens one GPU
    holds); ``num_gpus`` the size of the ``dp × cp`` pool. Every sequence needs at most
    ``num_gpus`` GPUs (else ``ValueError``).
    """
    s = [int(x) for x in np.asarray(lengths, dtype=np.int64)]
    if s and max(gpus_needed(x, max_seq_len_per_rank) for x in s) > num_gpus:
        longest = max(s)
        raise ValueError(
            f"a {longest}-token sequence needs {gpus_needed(longest, max_seq_len_per_rank)} GPUs of "
            f"{max_seq_len_per_rank} tokens each, more than the {num_gpus} of the dp×cp pool; cap lengths"
        )
    items = sorted(enumerate(s), key=lambda t: t[1], reverse=True)
    rounds: list[CpRound] = []
    while items:
        rnd, items = _one_round(items, max_seq_len_per_rank, num_gpus, delta)
        order = sorted(range(len(rnd.size)), key=lambda g: rnd.start[g])
        groups = tuple(tuple(range(rnd.start[g], rnd.start[g] + rnd.size[g])) for g in order)
        positions = tuple(tuple(p for p, _ in rnd.seqs[g]) for g in order)
        rounds.append(CpRound(groups, positions))
    return rounds
