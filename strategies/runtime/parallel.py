"""Tensor- and context-parallel communication as autograd functions.

Tensor parallelism (Megatron-style) wraps each attention / MLP block in two regions:

* ``copy_to_tp``      — identity forward, all-reduce of the input gradient backward
  (the block's input is replicated; each rank's shard contributes a partial gradient);
* ``reduce_from_tp``  — all-reduce forward (sum of the row-parallel partial outputs),
  identity backward (every rank receives the full output gradient).

The vocabulary is split over tp in chunks (:func:`tp_range`: sizes differ by at most one,
the larger first — an even split where it divides); ``gather_from_tp`` concatenates the
ranks' chunks of the last dim (full-vocabulary logits), its backward keeps this rank's.
Vocabulary-parallel embedding and cross-entropy are built on these in :mod:`~.vocab`.

Context parallelism all-gathers keys and values inside the cp group:
``gather_from_cp`` returns the whole micro-batch's K/V in packed-row order; its
backward all-reduces the K/V gradient over the cp group (every cp rank's queries
touch every rank's keys) and keeps the rows this rank owns. gloo has no
reduce-scatter with uneven sizes, so all-reduce-then-slice is the portable form.

With a degree of 1 every function is the identity and issues no collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["ParallelContext", "SINGLE_DEVICE", "copy_to_tp", "reduce_from_tp", "gather_from_tp", "gather_from_cp",
           "tp_range"]


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """Where this rank sits inside its replica for one strategy.

    Runtime objects (process groups) live here, not in a config: a context is built
    by the engine once per strategy at start-up and reused every step.
    """

    tp_size: int = 1
    """Tensor-parallel degree of the replica."""
    tp_rank: int = 0
    """This rank's tensor-parallel coordinate, ``0 .. tp_size-1``."""
    tp_group: dist.ProcessGroup | None = None
    """Process group of the ranks sharing this rank's tensor-parallel shard set."""
    cp_size: int = 1
    """Context-parallel degree of the replica."""
    cp_rank: int = 0
    """This rank's context-parallel coordinate, ``0 .. cp_size-1``."""
    cp_group: dist.ProcessGroup | None = None
    """Process group of the ranks splitting one sequence's tokens with this rank."""
    cp_order: tuple[int, ...] = (0,)
    """cp coordinate of each member of ``cp_group`` in group-rank order (all-gather order)."""

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"ParallelContext: tp_rank={self.tp_rank} outside 0..{self.tp_size - 1}")
        if not 0 <= self.cp_rank < self.cp_size:
            raise ValueError(f"ParallelContext: cp_rank={self.cp_rank} outside 0..{self.cp_size - 1}")
        if self.tp_size > 1 and self.tp_group is None:
            raise ValueError(f"ParallelContext: tp_size={self.tp_size} needs a tp_group")
        if self.cp_size > 1 and self.cp_group is None:
            raise ValueError(f"ParallelContext: cp_size={self.cp_size} needs a cp_group")
        if sorted(self.cp_order) != list(range(self.cp_size)):
            raise ValueError(
                f"ParallelContext: cp_order={self.cp_order} must be a permutation of 0..{self.cp_size - 1}"
            )


SINGLE_DEVICE = ParallelContext()
"""The context of an unsharded model on one device (tp = cp = 1)."""


def tp_range(n: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """``(start, length)`` of tp rank ``tp_rank``'s chunk of a dim of ``n`` split over ``tp_size``.

    Lengths differ by at most one, the first ``n % tp_size`` ranks holding the longer chunks
    (``n // tp_size`` each where it divides: the even split of heads and MLP columns).
    """
    base, extra = divmod(n, tp_size)
    return tp_rank * base + min(tp_rank, extra), base + (tp_rank < extra)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def copy_to_tp(x: torch.Tensor, pc: ParallelContext) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce backward."""
    if pc.tp_size == 1:
        return x
    return _CopyToTP.apply(x, pc.tp_group)


def reduce_from_tp(x: torch.Tensor, pc: ParallelContext) -> torch.Tensor:
    """Leave a tensor-parallel region: all-reduce forward, identity backward."""
    if pc.tp_size == 1:
        return x
    return _ReduceFromTP.apply(x, pc.tp_group)


def gather_from_tp(local: torch.Tensor, pc: ParallelContext, full: int) -> torch.Tensor:
    """The tp ranks' chunks (:func:`tp_range` of ``full``) of ``local``'s last dim, concatenated.

    Each rank places its chunk in zeros of the full width and the group sums them (exact:
    every element is one rank's value plus zeros; independent of the group's rank order), so
    the backward is :func:`reduce_from_tp`'s identity followed by this rank's slice.
    """
    if pc.tp_size == 1:
        return local
    start, length = tp_range(full, pc.tp_size, pc.tp_rank)
    if local.shape[-1] != length:
        raise ValueError(f"gather_from_tp: last dim {local.shape[-1]} is not tp rank {pc.tp_rank}'s chunk "
                         f"({length} of {full})")
    return reduce_from_tp(torch.nn.functional.pad(local, (start, full - start - length)), pc)


class _GatherFromCP(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        local: torch.Tensor,
        group: dist.ProcessGroup,
        counts_in_group_order: tuple[int, ...],
        full_from_gathered: torch.Tensor,
        own_rows: torch.Tensor,
    ) -> torch.Tensor:
        # local: (T_local, ...) → every member pads to the largest count (>= 1: some
        # backends reject empty buffers), all-gathers, drops the padding, reorders.
        width = max(max(counts_in_group_order), 1)
        buf = local.new_zeros((width, *local.shape[1:]))
        buf[: local.shape[0]] = local
        outs = [torch.empty_like(buf) for _ in counts_in_group_order]
        dist.all_gather(outs, buf, group=group)
        gathered = torch.cat([o[:n] for o, n in zip(outs, counts_in_group_order)])  # (T, ...)
        ctx.group = group
        ctx.save_for_backward(own_rows)
        return gathered.index_select(0, full_from_gathered)  # (T, ...) in packed-row order

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):  # type: ignore[override]
        (own_rows,) = ctx.saved_tensors
        grad_full = grad_full.contiguous().clone()
        dist.all_reduce(grad_full, group=ctx.group)
        return grad_full.index_select(0, own_rows), None, None, None, None


def gather_from_cp(
    local: torch.Tensor,
    pc: ParallelContext,
    counts: tuple[int, ...],
    full_from_gathered: torch.Tensor,
    own_rows: torch.Tensor,
) -> torch.Tensor:
    """All-gather this rank's rows of ``local`` over the cp group, in packed-row order.

    ``counts[r]`` = rows held by cp rank ``r``; ``full_from_gathered`` indexes the
    concatenation of all members' rows (in ``pc.cp_order``) to give packed-row order;
    ``own_rows`` are this rank's packed-row positions (backward keeps these rows).
    """
    if pc.cp_size == 1:
        return local
    ordered = tuple(counts[r] for r in pc.cp_order)
    return _GatherFromCP.apply(local, pc.cp_group, ordered, full_from_gathered, own_rows)
