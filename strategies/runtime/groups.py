"""Process groups and the split all-reduce plan of every candidate strategy.

**Blocks.** Every tensor-parallel-sharded parameter is cut along its split dim into
``num_blocks`` equal blocks, ``num_blocks`` = the least common multiple of the tp
degrees among the candidates (the finest tp granularity). Under a layout with degree
``tp``, tp rank ``t`` holds blocks ``[t·B/tp, (t+1)·B/tp)``; every rank holds all of a
replicated parameter (embedding, norms, LM head).

**Holders.** For strategy ``S`` and block ``k`` the holders are, in every replica, the
ranks whose tp coordinate holds ``k`` — one per cp coordinate. Blocks with the same
holder set share one all-reduce (a *bucket*); replicated parameters go to the bucket of
all ranks. This is the split all-reduce of HSPMD (arXiv 2504.20490): each block is
reduced across exactly the ranks that hold it.

**Contributions** (each replica contributes each element exactly once): a sharded block
is held by one tp rank per cp coordinate, and the cp ranks' partial gradients (their own
tokens) add up to the replica's; a replicated parameter's gradient is the same on all tp
ranks of a (cp coordinate of a) replica, so only tp rank 0 contributes, the others add zeros.

**Creation order.** :class:`GroupRegistry` creates a group the first time its (sorted)
rank tuple is requested; the engine requests, strategy by strategy in candidate order,
the tp groups, the cp groups, then the buckets — the same sequence on every rank, as
``torch.distributed.new_group`` requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch.distributed as dist

from strategies.layout import Strategy

__all__ = ["GroupRegistry", "SyncBucket", "num_blocks_for", "held_blocks", "block_holders", "plan_buckets"]


def num_blocks_for(strategies: Sequence[Strategy]) -> int:
    """Blocks per sharded parameter: lcm of every tp degree among ``strategies``."""
    out = 1
    for s in strategies:
        for rep in s.replicas:
            out = math.lcm(out, rep.layout.tp)
    return out


def held_blocks(tp: int, tp_rank: int, num_blocks: int) -> range:
    """Blocks of a sharded parameter that tp rank ``tp_rank`` of a degree-``tp`` replica holds."""
    if num_blocks % tp:
        raise ValueError(f"num_blocks={num_blocks} is not a multiple of tp={tp}")
    per = num_blocks // tp
    return range(tp_rank * per, (tp_rank + 1) * per)


def block_holders(strategy: Strategy, block: int, num_blocks: int) -> tuple[int, ...]:
    """Sorted ranks of ``strategy`` that hold ``block`` of every sharded parameter."""
    ranks: list[int] = []
    for rep in strategy.replicas:
        lay = rep.layout
        if lay.pp > 1:
            raise ValueError(
                f"strategy {strategy.name!r}: layout {lay.name} has pp={lay.pp}; the runtime has no pipeline stages"
            )
        t = block // (num_blocks // lay.tp)
        ranks.extend(rep.rank_at(t, c) for c in range(lay.cp))
    return tuple(sorted(ranks))


@dataclass(frozen=True, slots=True)
class SyncBucket:
    """One all-reduce of the split all-reduce: a holder set and what it carries."""

    ranks: tuple[int, ...]
    """Sorted global ranks taking part (the holders)."""
    blocks: tuple[int, ...]
    """Blocks of every sharded parameter reduced here (ascending)."""
    replicated: bool
    """Whether the replicated parameters are reduced here (only in the all-ranks bucket)."""


def plan_buckets(strategy: Strategy, num_blocks: int) -> list[SyncBucket]:
    """Buckets of ``strategy`` in the one global order every rank follows (by rank tuple)."""
    world = tuple(range(strategy.num_ranks))
    by_holders: dict[tuple[int, ...], list[int]] = {}
    for k in range(num_blocks):
        by_holders.setdefault(block_holders(strategy, k, num_blocks), []).append(k)
    by_holders.setdefault(world, [])
    return [
        SyncBucket(ranks=ranks, blocks=tuple(blocks), replicated=ranks == world)
        for ranks, blocks in sorted(by_holders.items())
    ]


class GroupRegistry:
    """Creates each distinct process group once, in request order, identically on every rank.

    A single-rank tuple needs no group (``None``); the all-ranks tuple is the default
    group. After :meth:`freeze` any request for a group that does not exist yet raises.
    """

    def __init__(self, world_size: int, timeout: timedelta) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        self.created: list[tuple[int, ...]] = []
        """Rank tuples for which a new group was created, in creation order."""
        self._frozen = False

    def get(self, ranks: Sequence[int]) -> dist.ProcessGroup | None:
        key = tuple(sorted(int(r) for r in ranks))
        if key in self._groups:
            return self._groups[key]
        if self._frozen:
            raise RuntimeError(f"process group {list(key)} was not created at start-up; groups are frozen")
        if len(key) == 1:
            group = None
        elif key == tuple(range(self.world_size)):
            group = dist.group.WORLD
        else:
            group = dist.new_group(list(key), timeout=self.timeout)
            self.created.append(key)
        self._groups[key] = group
        return group

    def freeze(self) -> None:
        self._frozen = True
