"""Exact gradient synchronisation across heterogeneous replicas (one strategy, one rank).

After the backward pass each rank's master ``.grad`` holds its replica-local partial
gradient on the blocks it holds (zeros elsewhere). Two phases make it the global
gradient on every rank:

1. **split all-reduce** — for each bucket of :func:`~.groups.plan_buckets` this rank
   belongs to (in the one global order): pack the bucket's blocks of every sharded
   parameter (and, in the all-ranks bucket, the replicated parameters — zeros unless this
   rank is tp rank 0) into one flat buffer, all-reduce it over the holders, unpack. Now
   every held block carries the sum over replicas, each replica counted once.
2. **tp all-gather** — inside each tensor-parallel group the ranks exchange their
   (now global) shards, so every rank has the full gradient of every parameter and can
   run the same optimizer step on the same full master parameters.

All ranks follow the same total order of collectives (phase-1 buckets sorted by rank
tuple, then the tp groups), so no wait cycle can form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .groups import SyncBucket

__all__ = ["ShardedParam", "GradientSync"]


@dataclass(frozen=True, slots=True)
class ShardedParam:
    """A master parameter and how it is cut for tensor parallelism."""

    name: str
    param: torch.nn.Parameter
    split_dim: int | None
    """Dim split over tp ranks, or ``None`` for a replicated parameter."""


class GradientSync:
    """Phase 1 (split all-reduce) and phase 2 (tp all-gather) for one strategy on this rank."""

    def __init__(
        self,
        params: list[ShardedParam],
        buckets: list[tuple[SyncBucket, dist.ProcessGroup | None]],
        num_blocks: int,
        tp_size: int,
        tp_rank: int,
        tp_group: dist.ProcessGroup | None,
        tp_order: tuple[int, ...],
    ) -> None:
        self.replicated = [p.param for p in params if p.split_dim is None]
        self.sharded = [(p.param, p.split_dim) for p in params if p.split_dim is not None]
        for p, dim in self.sharded:
            if p.shape[dim] % num_blocks:
                raise ValueError(
                    f"parameter of shape {tuple(p.shape)} cannot be cut into {num_blocks} blocks on dim {dim}"
                )
        self.buckets = buckets
        """This rank's buckets with their groups, in the global order."""
        self.num_blocks = num_blocks
        self.tp_size = tp_size
        self.tp_rank = tp_rank
        self.tp_group = tp_group
        self.tp_order = tp_order
        """tp coordinate of each member of ``tp_group`` in group-rank order."""

    # -- phase 1 ---------------------------------------------------------------------------
    def _bucket_views(self, bucket: SyncBucket) -> list[tuple[torch.Tensor, bool]]:
        """(gradient view, contributes) for every piece of ``bucket`` on this rank."""
        out: list[tuple[torch.Tensor, bool]] = []
        if bucket.replicated:
            out.extend((p.grad, self.tp_rank == 0) for p in self.replicated)
        for p, dim in self.sharded:
            size = p.shape[dim] // self.num_blocks
            out.extend((p.grad.narrow(dim, k * size, size), True) for k in bucket.blocks)
        return out

    def split_all_reduce(self) -> None:
        for bucket, group in self.buckets:
            views = self._bucket_views(bucket)
            if group is None or not views:
                continue  # a single holder already has the whole sum
            flat = torch.cat([g.reshape(-1) if contributes else g.new_zeros(g.numel()) for g, contributes in views])
            dist.all_reduce(flat, group=group)
            offset = 0
            for g, _ in views:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    # -- phase 2 ---------------------------------------------------------------------------
    def _shard_views(self, tp_rank: int) -> list[torch.Tensor]:
        out = []
        for p, dim in self.sharded:
            size = p.shape[dim] // self.tp_size
            out.append(p.grad.narrow(dim, tp_rank * size, size))
        return out

    def tp_all_gather(self) -> None:
        if self.tp_size == 1 or not self.sharded:
            return
        own = torch.cat([g.reshape(-1) for g in self._shard_views(self.tp_rank)])
        outs = [torch.empty_like(own) for _ in range(self.tp_size)]
        dist.all_gather(outs, own, group=self.tp_group)
        for member_tp, flat in zip(self.tp_order, outs):
            if member_tp == self.tp_rank:
                continue
            offset = 0
            for g in self._shard_views(member_tp):
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def __call__(self) -> None:
        """Turn every rank's local partial gradients into the global gradient, in place."""
        self.split_all_reduce()
        self.tp_all_gather()
