"""Checking one step before any compute: locally on each rank, then one agreement on all ranks.

:func:`check_step` validates this rank's part of a step without a collective (the plan
names a built strategy with the same replicas, this rank's micro-batches match the plan
and the packed format and fit the layout's token capacity) and prepares the batches.
:func:`agree` is one all-gather of ``[error flag, loss tokens, plan digest, normaliser,
row fingerprint]``: if any rank failed, or the ranks disagree, every rank raises the same
:class:`StepError` before any other collective — so a bad plan or batch never hangs a job.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.distributed as dist

from strategies.layout import Layout
from strategies.plan import StepPlan

from .batch import LocalBatch, check_micro_batch, prepare_micro_batch
from .parallel import ParallelContext

__all__ = ["StepError", "check_step", "agree", "unpack_step_batch"]


class StepError(RuntimeError):
    """A step was rejected before any compute; raised on every rank with the same message."""


def _digest60(plan: StepPlan) -> int:
    """First 60 bits of the plan digest (``sha256:<hex>``), to fit an int64 collective."""
    return int(plan.digest.split(":")[-1][:15], 16)


def unpack_step_batch(step_batch: Any) -> tuple[list[Any], int | None, StepPlan | None]:
    """``(micro-batches, global_loss_tokens or None, the plan it was built for or None)``."""
    if isinstance(step_batch, (list, tuple)):
        return list(step_batch), None, None
    if not hasattr(step_batch, "micro_batches"):
        return [step_batch], None, None  # the local check reports the wrong type
    glt = getattr(step_batch, "global_loss_tokens", None)
    plan = getattr(step_batch, "plan", None)
    if not isinstance(plan, StepPlan):
        plan = None
    return list(step_batch.micro_batches), None if glt is None else int(glt), plan


def check_step(
    plan: StepPlan,
    micro_batches: list[Any],
    normaliser: int | None,
    batch_plan: StepPlan | None,
    *,
    rank: int,
    built: dict[str, tuple[list[tuple[Layout, tuple[int, ...]]], ParallelContext]],
    capacity: Callable[[Layout], int | None],
    vocab_size: int,
    device: torch.device,
) -> tuple[list[LocalBatch], int, int]:
    """Local validation and preparation of one step; raises ``ValueError`` naming the problem.

    ``built[name]``: the built strategy's ``(layout, ranks)`` per replica and this rank's
    context. Returns the prepared micro-batches, the loss normaliser and a 60-bit
    fingerprint of this rank's token rows (ranks of one replica must hold the same).
    """
    if not isinstance(plan, StepPlan):
        raise ValueError(f"plan is a {type(plan).__name__}, expected strategies.plan.StepPlan")
    if plan.strategy not in built:
        raise ValueError(
            f"plan for step {plan.step} names strategy {plan.strategy!r}, which was not built; "
            f"built: {list(built)}. Pass every strategy the planner may pick as a candidate"
        )
    replicas, context = built[plan.strategy]
    planned = [(r.layout, r.ranks) for r in plan.replicas]
    if replicas != planned:
        raise ValueError(
            f"plan for step {plan.step}: strategy {plan.strategy!r} has replicas "
            f"{[(lay.name, list(rk)) for lay, rk in planned]} but the built one has "
            f"{[(lay.name, list(rk)) for lay, rk in replicas]}; "
            "plan with the same candidate list the engine was built with"
        )
    if batch_plan is not None and batch_plan.digest != plan.digest:
        raise ValueError(f"step batch was built for plan {batch_plan.digest}, not for the plan passed ({plan.digest})")
    rank_plan = plan.for_rank(rank)
    if len(micro_batches) != len(rank_plan.micro_batches):
        raise ValueError(
            f"rank {rank} got {len(micro_batches)} micro-batches but plan step {plan.step} gives it "
            f"{len(rank_plan.micro_batches)}; pass the micro-batches of plan.for_rank({rank})"
        )
    layout = next(lay for lay, ranks in replicas if rank in ranks)
    cap = capacity(layout)
    checked = [check_micro_batch(mb, k, vocab_size) for k, mb in enumerate(micro_batches)]
    for k, (mb, ids) in enumerate(zip(checked, rank_plan.micro_batches)):
        if mb.sample_ids is not None and mb.sample_ids.tolist() != list(ids):
            raise ValueError(
                f"rank {rank} micro-batch {k} holds samples {mb.sample_ids.tolist()[:8]} but the plan "
                f"says {list(ids)[:8]}; batches and plan are out of step"
            )
        if cap is not None and mb.num_tokens > cap:
            raise ValueError(
                f"rank {rank} micro-batch {k} holds {mb.num_tokens} tokens, above the capacity {cap} "
                f"of layout {layout.name}; re-plan with the engine's token capacities"
            )
        if mb.global_loss_tokens is not None:
            if normaliser is None:
                normaliser = mb.global_loss_tokens
            elif mb.global_loss_tokens != normaliser:
                raise ValueError(
                    f"micro-batch {k} says global_loss_tokens={mb.global_loss_tokens} "
                    f"but the step batch says {normaliser}"
                )
    if normaliser is None:
        normaliser = int(plan.global_loss_tokens)
    if normaliser < 1:
        raise ValueError(f"global_loss_tokens={normaliser}: the step has no loss tokens to average over")
    local = [prepare_micro_batch(mb, context, device) for mb in checked]
    h = hashlib.sha256(str(len(checked)).encode())
    for mb in checked:
        h.update(mb.seq_lens.tobytes())
        h.update(mb.input_ids.tobytes())
    return local, int(normaliser), int(h.hexdigest()[:15], 16)


def agree(plan: Any, error: str | None, loss_tokens: int, normaliser: int, fingerprint: int,
          *, world_size: int, device: torch.device) -> None:
    """One all-gather; every rank raises :class:`StepError` if any rank failed or they disagree."""
    digest = _digest60(plan) if isinstance(plan, StepPlan) else 0
    mine = torch.tensor([int(error is not None), loss_tokens, digest, normaliser, fingerprint],
                        dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    table = torch.stack(every).cpu()  # (world, 5)
    step = getattr(plan, "step", "?")
    if bool(table[:, 0].any()):
        messages: list[str | None] = [None] * world_size
        dist.all_gather_object(messages, error)
        failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
        raise StepError(f"step {step} rejected on every rank — {failed}")
    if bool((table[:, 2] != table[0, 2]).any()):
        raise StepError(
            f"step {step}: ranks hold different plans (digest prefixes {table[:, 2].tolist()}); "
            "every rank must derive or receive the same StepPlan"
        )
    if bool((table[:, 3] != table[0, 3]).any()):
        raise StepError(f"step {step}: ranks disagree on global_loss_tokens {table[:, 3].tolist()}")
    for j, rep in enumerate(plan.replicas):
        prints = {int(table[r, 4]) for r in rep.ranks}
        if len(prints) > 1:
            raise StepError(
                f"step {step}: the ranks {list(rep.ranks)} of replica {j} hold different micro-batches; "
                "every rank of a replica must be given the same packed rows"
            )
    total = int(table[:, 1].sum())
    if total != normaliser:
        raise StepError(
            f"step {step}: global_loss_tokens={normaliser} but the ranks' labels hold {total} loss tokens; "
            "the collator's count and the labels disagree"
        )
