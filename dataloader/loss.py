"""Loss normalisation: per-micro-batch losses that add up to the global token mean.

A balanced step gives ranks different numbers of sequences, tokens and micro-batches,
so averaging per micro-batch (or per rank) would weight tokens unequally. Instead every
micro-batch contributes ``Σ token losses / global_loss_tokens``, where
``global_loss_tokens`` counts the loss tokens of the whole global batch (every rank,
every micro-batch; the collator puts it in each batch). Then

    Σ_ranks Σ_micro-batches loss_k  =  (Σ over all loss tokens of the step) / global_loss_tokens

is exactly the global token mean, and its gradient is the gradient of the unbalanced
run on the same global batch — provided the gradients are **summed** across data-parallel
replicas. Frameworks that **average** instead (DDP, FSDP: all-reduce then divide by the
world size) need the loss multiplied by that divisor: pass ``grad_divisor=world_size``.

Ranks of one replica that hold the same tokens (tensor-parallel peers) each compute the
same loss; count it once per replica (the runtime's split all-reduce does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .lengths import IGNORE_INDEX

__all__ = ["normalize", "packed_loss", "token_loss_sum", "target_loss_sum"]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of next-token cross-entropies, Hugging Face convention (the labels are shifted here).

    ``logits`` (B, T, V), ``labels`` (B, T): position ``t``'s logits are scored against
    ``labels[t+1]``; ``ignore_index`` labels carry no loss. Returns a 0-d float32 tensor.
    """
    if labels.numel() == 0:
        return logits.sum() * 0.0  # an empty micro-batch (idle rank), also when the model ran a placeholder token
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (batch, tokens)")
    if labels.shape[-1] < 2:
        return logits.sum() * 0.0  # keeps the graph (and every parameter's grad) alive
    return target_loss_sum(logits[..., :-1, :], labels[..., 1:], ignore_index=ignore_index)


def target_loss_sum(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of cross-entropies against already-shifted ``targets`` (e.g. a cp shard's ``target_ids``)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on (batch, tokens)")
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )


def normalize(loss_sum: torch.Tensor, global_loss_tokens: int, *, grad_divisor: int = 1) -> torch.Tensor:
    """``loss_sum · grad_divisor / global_loss_tokens``.

    ``grad_divisor``: the number the framework divides summed gradients by — 1 when
    gradients are summed across replicas, the data-parallel world size for DDP/FSDP.
    A global batch without loss tokens gives 0 (with the graph kept).
    """
    if grad_divisor < 1:
        raise ValueError(f"grad_divisor={grad_divisor} must be >= 1 (1 = summed gradients, world size = DDP)")
    if global_loss_tokens < 0:
        raise ValueError(f"global_loss_tokens={global_loss_tokens} must be >= 0")
    if global_loss_tokens == 0:
        return loss_sum * 0.0
    return loss_sum * (grad_divisor / global_loss_tokens)


def packed_loss(logits: torch.Tensor, batch: Mapping[str, Any], *, grad_divisor: int = 1) -> torch.Tensor:
    """Normalised loss of one collated micro-batch (packed, padded or a cp shard).

    Uses ``batch["target_ids"]`` (no shift) when present, else ``batch["labels"]`` (HF
    shift), and ``batch["global_loss_tokens"]``. Summed over a rank's micro-batches and
    all-reduced (summed) over replicas this is the global token-mean loss; see
    :func:`normalize` for ``grad_divisor``.
    """
    if "target_ids" in batch:
        total = target_loss_sum(logits, batch["target_ids"])
    else:
        total = token_loss_sum(logits, batch["labels"])
    return normalize(total, int(batch["global_loss_tokens"]), grad_divisor=grad_divisor)
