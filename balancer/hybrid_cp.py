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
    """Mutable state of one round: per GPU its sequences, load and group."""

    def __init__(self, num_gpus: int) -> None:
        self.n = num_gpus
        self.seqs: list[list[tuple[int, int]]] = [[] for _ in range(num_gpus)]  # (position, length)
        self.load = [0.0] * num_gpus
        self.in_group = [False] * num_gpus
        self.members: list[list[int]] = []  # group id → GPUs, ids in creation order
        self.size: list[int] = []

    def free(self) -> list[int]:
        return [g for g in range(self.n) if not self.in_group[g]]

    def place(self, item: tuple[int, int], need: int, work: float) -> None:
        same = [gid for gid, sz in enumerate(self.size) if sz == need]
        best_gid, best_load = None, math.inf
        for gid in same:  # least-loaded busiest GPU; the first group on ties
            busiest = max(self.load[g] for g in self.members[gid])
            if busiest < best_load:
                best_gid, best_load = gid, busiest
        free = self.free()
        if len(free) >= need:
            fresh = sorted(free, key=lambda g: self.load[g])[:need]
            if self.load[fresh[-1]] < best_load:
                best_gid = len(self.size)
                self.members.append(fresh)
                self.size.append(need)
                for g in fresh:
                    self.in_group[g] = True
        assert best_gid is not None
        for g in self.members[best_gid]:
            self.seqs[g].append(item)
            self.load[g] += work

    def spread_ok(self, delta: float) -> bool:
        top = max(self.load)
        return top - min(self.load) <= delta * top


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
        top, low = max(rnd.load), min(rnd.load)
        if top - low <= delta * top or low == 0:
            return
        g = rnd.load.index(top)
        if len(rnd.seqs[g]) <= 1:
            return
        gid = next(i for i, m in enumerate(rnd.members) if g in m)
        pos, length = rnd.seqs[g][-1]
        work = length * length / gpus_needed(length, msl)
        after = list(rnd.load)
        for m in rnd.members[gid]:
            after[m] -= work
        if max(after) - min(after) >= top - low:
            return
        for m in rnd.members[gid]:
            rnd.seqs[m].pop()
            rnd.load[m] -= work
        left.append((pos, length))


def _fill_idle(rnd: _Round, num_gpus: int) -> None:
    """Double the first smallest group until no GPU is idle, shifting the groups after it."""
    while any(not s for s in rnd.seqs):
        smallest = min(rnd.size)
        grown = min(2 * smallest, num_gpus)
        extra = grown - smallest
        gid = rnd.size.index(smallest)
        first, last = rnd.members[gid][0], rnd.members[gid][-1]
        idle = next(g for g in range(num_gpus) if not rnd.seqs[g])
        if num_gpus - idle < extra:  # Megatron indexes past its GPU list here (IndexError)
            raise ValueError(
                f"Megatron's hybrid-cp schedule cannot fill {num_gpus - idle} idle GPUs by doubling a "
                f"{smallest}-GPU group (it fails on this batch); use a power-of-two dp×cp pool"
            )
        pushed = rnd.seqs[last + 1 : idle]
        seqs: list[list[tuple[int, int]]] = [[] for _ in range(num_gpus)]
        seqs[:first] = rnd.seqs[:first]
        for g in range(first, last + extra + 1):
            seqs[g] = rnd.seqs[last]
        for i, s in enumerate(pushed):
            seqs[last + extra + 1 + i] = s
        rnd.seqs = seqs
        rnd.size[gid] = grown
        rnd.members[gid] = list(range(first, last + extra + 1))
        for later in range(gid + 1, len(rnd.members)):
            rnd.members[later] = [g + extra for g in rnd.members[later]]


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
            if need[i] in rnd.size or len(rnd.free()) >= need[i]:
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
        if check and buckets and rnd.spread_ok(delta):
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
        groups, positions = [], []
        for gpus in sorted(rnd.members, key=lambda m: m[0]):
            groups.append(tuple(gpus))
            positions.append(tuple(p for p, _ in rnd.seqs[gpus[0]]))
        rounds.append(CpRound(tuple(groups), tuple(positions)))
    return rounds
