"""Process groups of every candidate strategy, created once at start-up.

**Creation order.** :class:`GroupRegistry` creates a group the first time its (sorted)
rank tuple is requested; the engine requests, strategy by strategy in candidate order,
the tp groups then the cp groups of every replica — the same sequence on every rank, as
``torch.distributed.new_group`` requires. Gradients need no group of their own: they are
reduce-scattered over all ranks to the owners of the sharded state (:mod:`~.state`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Sequence

import torch.distributed as dist

__all__ = ["GroupRegistry"]


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
        self.created_groups: list[dist.ProcessGroup] = []
        """The groups created, in the same order."""
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
            self.created_groups.append(group)
        self._groups[key] = group
        return group

    def freeze(self) -> None:
        self._frozen = True
