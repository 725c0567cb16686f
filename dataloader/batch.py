"""What the loader yields per step (:class:`StepBatch`) and how a sample is cut to a piece.

Shared by the map-style loader (:mod:`dataloader.loader`) and the streaming one
(:mod:`dataloader.stream`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Mapping

from strategies.plan import RankPlan, StepPlan

from .spec import MicroBatchSpec

__all__ = ["SEQUENCE_KEYS", "StepBatch", "cut_sample", "fsdp2_accumulation"]

SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask", "token_type_ids", "position_ids", "loss_mask")
"""Per-token sample fields cut together when a sample is truncated or split."""


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

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)

    def is_last_micro_batch(self, k: int) -> bool:
        """True for the micro-batch whose backward must synchronise gradients."""
        if not 0 <= k < len(self.micro_batches):
            raise IndexError(f"micro-batch {k} outside 0..{len(self.micro_batches) - 1}")
        return k == len(self.micro_batches) - 1

    def num_loss_tokens(self, k: int) -> int:
        """Planned loss tokens of micro-batch ``k`` on this rank."""
        return self.specs[k].num_loss_tokens

    def sync_context(self, model: Any, k: int) -> contextlib.AbstractContextManager[Any]:
        """Synchronise gradients once per step, after micro-batch ``k`` if it is the last.

        DDP and FSDP1 (``no_sync``): ``model.no_sync()`` on all but the last micro-batch.
        FSDP2 (``fully_shard``): see :func:`fsdp2_accumulation`. Anything else: a null context.
        """
        last = self.is_last_micro_batch(k)
        if hasattr(model, "set_requires_gradient_sync") and hasattr(model, "set_reshard_after_backward"):
            fsdp2_accumulation(model, last=last)
            return contextlib.nullcontext()
        if not last and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()


def fsdp2_accumulation(model: Any, *, last: bool) -> None:
    """Set an FSDP2 root module up for one micro-batch of a step (called by ``StepBatch.sync_context``).

    Ranks run different numbers of micro-batches in a balanced step, so every rank must
    issue the same collectives whatever its count. Before the last micro-batch the
    parameters stay unsharded after forward and backward and the gradients accumulate
    unsharded, without a reduce-scatter; the last micro-batch reshards after forward
    (fully_shard's default: inner modules reshard, the root does not), re-gathers in
    backward and reduce-scatters once. Every rank thus all-gathers each module in its first
    forward, all-gathers again and reduce-scatters in its last backward — one sequence for
    one micro-batch or ten — and ranks never wait for each other inside a step, as the
    planner assumes. The price: parameters and gradients are held unsharded from the first
    micro-batch to the last (like DDP; optimizer states stay sharded). An ``int``
    ``reshard_after_forward`` given to ``fully_shard`` is reset to that default.
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
