"""What the loader yields per step (:class:`StepBatch`) and how a sample is cut to a piece.

Shared by the map-style loader (:mod:`dataloader.loader`) and the streaming one
(:mod:`dataloader.stream`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from balancer.lockstep import longest_first
from strategies.plan import RankPlan, StepPlan

from .lengths import IGNORE_INDEX
from .spec import MicroBatchSpec

__all__ = ["SEQUENCE_KEYS", "SYNC_MODES", "StepBatch", "cut_sample", "fsdp2_accumulation", "pad_micro_batch"]

SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask", "token_type_ids", "position_ids", "loss_mask")
"""Per-token sample fields cut together when a sample is truncated or split."""
SYNC_MODES = ("accumulate", "reshard")
"""``StepBatch.sync_context`` modes: synchronise once per step, or after every micro-batch (lockstep)."""


@dataclass(frozen=True, kw_only=True)
class StepBatch:
    """One optimizer step on this rank (design.md §7)."""

    step: int
    """Global step (from the start of the run, across epochs)."""
    epoch: int
    step_in_epoch: int
    plan: StepPlan
    rank_plan: RankPlan
    micro_batches: list[Any]
    """Collated micro-batches in execution order (packed dicts by default)."""
    specs: tuple[MicroBatchSpec, ...]
    """What each micro-batch holds (sample ids, pieces, planned loss tokens)."""
    global_loss_tokens: int
    """Loss tokens of the whole global batch; divide summed token losses by this."""
    _lockstep: list[int] = field(default_factory=list, init=False, repr=False, compare=False)
    """Set by :meth:`lockstep_micro_batches`: the count this rank was given (``sync_context`` checks it)."""

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)

    @property
    def num_lockstep_micro_batches(self) -> int:
        """The step's largest micro-batch count over the replicas: what every rank runs in lockstep.

        Read from the whole plan (every rank holds it), so no communication is needed."""
        return max(len(r.micro_batches) for r in self.plan.replicas)

    def is_last_micro_batch(self, k: int) -> bool:
        """True for the micro-batch whose backward must synchronise gradients."""
        if not 0 <= k < len(self.micro_batches):
            raise IndexError(f"micro-batch {k} outside 0..{len(self.micro_batches) - 1}")
        return k == len(self.micro_batches) - 1

    def num_loss_tokens(self, k: int) -> int:
        """Planned loss tokens of micro-batch ``k`` on this rank (plan order, as in :attr:`micro_batches`)."""
        return self.specs[k].num_loss_tokens

    def lockstep_micro_batches(self, pad: Any = None, *, cost: Any = None) -> list[tuple[int, Any]]:
        """``(k, micro-batch)`` for ``k`` in ``0..num_lockstep_micro_batches-1``: the same count on every rank.

        For engines that synchronise at every micro-batch (``sync_context(model, k,
        mode="reshard")``, FSDP2 resharding): this rank's micro-batches, then ``pad`` for
        each missing one. ``pad``: a micro-batch that runs forward and backward with zero
        loss weight; default (packed micro-batches of :class:`~dataloader.PackedCollator`)
        :func:`pad_micro_batch` — a one-token row whose label is ``-100``, so
        :func:`~dataloader.packed_loss` is ``0·Σ logits`` and adds exactly zero to every
        gradient. Give it for other collators.

        Order: in lockstep a step costs ``Σ_k max_r T(r, k)`` instead of ``max_r Σ_k T(r, k)``,
        smallest when every rank runs its micro-batches longest first (``balancer.lockstep``).
        The Balancer's plans already list a ``pp = 1`` replica's micro-batches longest first
        by its cost model, so by default the plan's order is kept. ``cost``: re-sort by
        ``cost.micro_batch_seconds(seq_lens)`` (seconds, e.g. a ``LayoutCost``) — for plans
        made otherwise. (Most tokens first is no substitute: micro-batches packed to the same
        token capacity differ by their attention term; ``benchmarks/lockstep.py``.)
        """
        if cost is not None and not callable(getattr(cost, "micro_batch_seconds", None)):
            raise TypeError(
                f"cost={type(cost).__name__} has no micro_batch_seconds(seq_lens); pass a LayoutCost "
                "(balancer.cost_model.cost(Layout(1))) or None to keep the plan's order"
            )
        count = self.num_lockstep_micro_batches
        if len(self.micro_batches) > count:
            raise ValueError(
                f"rank {self.rank_plan.rank} has {len(self.micro_batches)} micro-batches but the plan's largest "
                f"count is {count}; this StepBatch does not match its plan"
            )
        runs = list(range(len(self.micro_batches)))
        if cost is not None:
            runs = longest_first([cost.micro_batch_seconds(spec.seq_lens) for spec in self.specs])
        out = [self.micro_batches[i] for i in runs]
        if len(out) < count:
            filler = pad if pad is not None else pad_micro_batch(self.micro_batches[0])
            out += [filler] * (count - len(out))
        self._lockstep[:] = [count]
        return list(enumerate(out))

    def sync_context(self, model: Any, k: int, mode: str = "accumulate") -> contextlib.AbstractContextManager[Any]:
        """The gradient synchronisation of micro-batch ``k``: once per step, or every micro-batch.

        ``mode="accumulate"`` (default): synchronise once, after micro-batch ``k`` if it is
        this rank's last (``k`` indexes :attr:`micro_batches`). DDP and FSDP1
        (``no_sync``): ``model.no_sync()`` on all but the last. FSDP2 (``fully_shard``):
        parameters and gradients held unsharded until the last (:func:`fsdp2_accumulation`).
        Anything else: a null context.

        ``mode="reshard"``: synchronise after every micro-batch — FSDP2 at its defaults
        (parameters resharded after forward and backward, gradients reduce-scattered each
        time), DDP/FSDP1 without ``no_sync``. Every rank must then run the same number of
        micro-batches: ``k`` indexes :meth:`lockstep_micro_batches`, which must have been
        called on this batch (checked: a rank running fewer would hang its peers).
        """
        if mode not in SYNC_MODES:
            raise ValueError(f"mode={mode!r}: choose one of {', '.join(SYNC_MODES)}")
        fsdp2 = hasattr(model, "set_requires_gradient_sync") and hasattr(model, "set_reshard_after_backward")
        if mode == "reshard":
            if not self._lockstep:
                raise RuntimeError(
                    "sync_context(mode='reshard') synchronises at every micro-batch, so every rank must run the same "
                    "number: iterate `for k, mb in batch.lockstep_micro_batches()` (not batch.micro_batches)"
                )
            count = self._lockstep[0]
            if not 0 <= k < count:
                raise IndexError(f"lockstep micro-batch {k} outside 0..{count - 1}")
            if fsdp2:
                fsdp2_accumulation(model, last=True)
            return contextlib.nullcontext()
        if not 0 <= k < len(self.micro_batches):
            hint = " (lockstep micro-batches need mode='reshard')" if self._lockstep else ""
            raise IndexError(f"micro-batch {k} outside 0..{len(self.micro_batches) - 1}{hint}")
        last = self.is_last_micro_batch(k)
        if fsdp2:
            fsdp2_accumulation(model, last=last)
            return contextlib.nullcontext()
        if not last and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()


def pad_micro_batch(like: Mapping[str, Any]) -> dict[str, Any]:
    """A one-token packed row with no loss: what a rank runs for a missing lockstep micro-batch.

    Built like ``like`` (a :class:`~dataloader.PackedCollator` micro-batch: its dtypes,
    devices and ``global_loss_tokens``): token id 0 at position 0 in a padding segment
    (``cu_seqlens = [0, 1]``, no sequences), label ``-100``. :func:`~dataloader.packed_loss`
    gives it ``0·Σ logits`` — a graph through every parameter whose gradient is exactly
    zero — and :func:`~dataloader.hf_packed_inputs` runs it as it is.
    """
    need = ("input_ids", "labels", "position_ids", "cu_seqlens", "global_loss_tokens")
    if not isinstance(like, Mapping) or "target_ids" in like or any(key not in like for key in need):
        what = sorted(like) if isinstance(like, Mapping) else type(like).__name__
        raise ValueError(
            f"cannot build a pad micro-batch like {what}: the default pad is a PackedCollator row (cp=1). "
            "Pass pad=: a micro-batch of your collator that runs forward and backward with zero loss weight"
        )
    ids, labels, pos, cu = (like[key] for key in ("input_ids", "labels", "position_ids", "cu_seqlens"))
    if not all(isinstance(t, torch.Tensor) for t in (ids, labels, pos, cu)):
        raise ValueError("cannot build a pad micro-batch from numpy arrays; pass pad= or collate to tensors")
    return {
        "input_ids": torch.zeros((1, 1), dtype=ids.dtype, device=ids.device),
        "labels": torch.full((1, 1), IGNORE_INDEX, dtype=labels.dtype, device=labels.device),
        "position_ids": torch.zeros((1, 1), dtype=pos.dtype, device=pos.device),
        "cu_seqlens": torch.tensor([0, 1], dtype=cu.dtype, device=cu.device),
        "max_seqlen": 1,
        "seq_lens": torch.zeros(0, dtype=torch.int64, device=ids.device),
        "sample_ids": torch.zeros(0, dtype=torch.int64, device=ids.device),
        "num_loss_tokens": 0,
        "global_loss_tokens": int(like["global_loss_tokens"]),
    }


def fsdp2_accumulation(model: Any, *, last: bool) -> None:
    """Set an FSDP2 root module up for one micro-batch of a step (called by ``StepBatch.sync_context``).

    ``mode="accumulate"``: ranks run different numbers of micro-batches in a balanced step,
    so every rank must issue the same collectives whatever its count. Before the last
    micro-batch the parameters stay unsharded after forward and backward and the gradients
    accumulate unsharded, without a reduce-scatter; the last micro-batch reshards after
    forward (fully_shard's default: inner modules reshard, the root does not), re-gathers in
    backward and reduce-scatters once. Every rank thus all-gathers each module in its first
    forward, all-gathers again and reduce-scatters in its last backward — one sequence for
    one micro-batch or ten — and ranks never wait for each other inside a step, as the
    planner assumes. The price: parameters and gradients are held unsharded from the first
    micro-batch to the last (like DDP; optimizer states stay sharded). An ``int``
    ``reshard_after_forward`` given to ``fully_shard`` is reset to that default.

    ``mode="reshard"`` calls it with ``last=True`` for every micro-batch: FSDP2's defaults.
    """
    model.set_requires_gradient_sync(last)
    model.set_reshard_after_backward(last)
    model.set_reshard_after_forward(last)
    if last:
        model.set_reshard_after_forward(False, recurse=False)  # the root keeps its parameters for backward


# ---------------------------------------------------------------------------------------
# pieces of the DataLoader: what workers run
# ---------------------------------------------------------------------------------------
def _tokens_of(sample: Any, key: str) -> Any:
    return sample[key] if isinstance(sample, Mapping) else sample


def cut_sample(sample: Any, spec: MicroBatchSpec, j: int, input_key: str, keys: Sequence[str]) -> Any:
    """Check sequence ``j`` of ``spec`` against the fetched ``sample`` and cut it to its piece."""
    sid = spec.sample_ids[j]
    if isinstance(sample, Mapping) and input_key not in sample:
        raise ValueError(f"sample {sid} has no field {input_key!r}; fields: {sorted(sample)}. Set input_key=...")
    tokens = _tokens_of(sample, input_key)
    got = len(tokens)
    if got != spec.full_lengths[j]:
        raise ValueError(
            f"sample {sid} has {got} tokens in the dataset but the length source says {spec.full_lengths[j]}; "
            "the lengths do not match the dataset (recompute them from this dataset)"
        )
    lo, hi = spec.starts[j], spec.ends[j]
    if lo == 0 and hi == got:
        return sample
    if not isinstance(sample, Mapping):
        return tokens[lo:hi]
    out = dict(sample)
    for key in keys:
        value = out.get(key)
        if value is not None and hasattr(value, "__len__") and len(value) == got:
            out[key] = value[lo:hi]
    return out
