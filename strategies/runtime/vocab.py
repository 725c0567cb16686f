"""The vocabulary split over tensor-parallel ranks: embedding lookup and cross-entropy.

Tp rank ``r`` holds rows ``tp_range(V, tp, r)`` of the embedding and of the LM head
(:func:`~.parallel.tp_range`: chunks of ``⌈V/tp⌉`` or ``⌊V/tp⌋`` rows, an uneven
vocabulary works), as in Megatron-LM:

* **embedding** (:func:`vocab_parallel_embedding`): each rank looks up the token ids it
  owns, zeros the others, and ``reduce_from_tp`` sums the rows — exact (every row is one
  rank's value plus zeros); backward identity, so each rank's embedding gradient gets
  exactly its own rows' share.
* **cross-entropy** (:func:`vocab_parallel_cross_entropy`) of the local logits
  ``(T, V/tp)`` in fp32, per token ``log Σ_v exp(l_v − m) + m − l_target``:
  the global max ``m`` (all-reduce MAX, no gradient: any constant gives the same loss),
  the sum of ``exp(l − m)`` over the local vocabulary all-reduced with ``reduce_from_tp``
  (forward sum, backward identity: every rank's softmax share), and the target's logit
  taken on the rank that owns it (zero elsewhere) and summed the same way. The gradient
  of the local logits is then ``softmax − onehot(target)`` restricted to this rank's
  vocabulary: the full gradient's columns, no full-vocabulary tensor anywhere.

With ``tp = 1`` both are plain ``F.embedding`` / ``F.cross_entropy`` (no collective).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .parallel import ParallelContext, reduce_from_tp, tp_range

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_embedding"]


def _own(ids: torch.Tensor, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local index clamped into the chunk, mask of the ids inside it)``."""
    local = ids - start
    inside = (local >= 0) & (local < length)
    return local.clamp(0, max(length - 1, 0)), inside


def vocab_parallel_embedding(ids: torch.Tensor, weight: torch.Tensor, pc: ParallelContext,
                             vocab_size: int) -> torch.Tensor:
    """Embeddings (T, hidden) of token ``ids`` (T,) from this rank's rows ``weight`` (V/tp, hidden),
    summed over the tp group (module docstring); replicated on every tp rank."""
    if pc.tp_size == 1:
        return F.embedding(ids, weight)
    start, length = tp_range(vocab_size, pc.tp_size, pc.tp_rank)
    local, inside = _own(ids, start, length)
    rows = F.embedding(local, weight).masked_fill(~inside[:, None], 0.0)
    return reduce_from_tp(rows, pc)


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pc: ParallelContext,
                                 vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Summed next-token cross-entropy (nats, fp32 scalar) of this rank's vocabulary chunk of the
    logits ``(T, V/tp)``, equal to ``F.cross_entropy`` of the full ``(T, V)`` logits with
    ``reduction="sum"``; ``targets`` equal to ``ignore_index`` count nothing. The same value on
    every tp rank."""
    logits = logits.float()
    if pc.tp_size == 1:
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    start, length = tp_range(vocab_size, pc.tp_size, pc.tp_rank)
    if logits.shape[-1] != length:
        raise ValueError(f"vocab_parallel_cross_entropy: {logits.shape[-1]} logits per token, tp rank "
                         f"{pc.tp_rank} of {pc.tp_size} owns {length} of the vocabulary of {vocab_size}")
    with torch.no_grad():
        m = logits.max(dim=-1).values  # (T,)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=pc.tp_group)
    sum_exp = reduce_from_tp(torch.exp(logits - m[:, None]).sum(dim=-1), pc)  # (T,)
    local, inside = _own(targets, start, length)
    picked = logits.gather(1, local[:, None]).squeeze(1).masked_fill(~inside, 0.0)
    target_logit = reduce_from_tp(picked, pc)  # (T,)
    per_token = torch.log(sum_exp) + m - target_logit
    return per_token.masked_fill(targets == ignore_index, 0.0).sum()
