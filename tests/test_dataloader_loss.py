"""Loss normalisation: micro-batch losses over global_loss_tokens add up to the global token mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataloader.collate import PackedCollator, PaddedCollator, cp_shard
from dataloader.loss import normalize, packed_loss, target_loss_sum, token_loss_sum
from dataloader.spec import MicroBatchSpec


def _spec(ids: list[int], seqs: list[list[int]], glt: int) -> MicroBatchSpec:
    lens = tuple(len(s) for s in seqs)
    return MicroBatchSpec(
        step=0,
        epoch=0,
        step_in_epoch=0,
        index=0,
        num_micro_batches=1,
        sample_ids=tuple(ids),
        starts=(0,) * len(seqs),
        ends=lens,
        full_lengths=lens,
        loss_tokens=tuple(n - 1 for n in lens),
        global_loss_tokens=glt,
    )


def test_micro_batch_losses_sum_to_the_global_token_mean() -> None:
    torch.manual_seed(0)
    vocab = 11
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, vocab, size=n).tolist() for n in (5, 2, 9, 1, 4, 7)]
    glt = sum(len(s) - 1 for s in seqs)
    table = torch.randn(vocab, vocab)  # logits = a fixed function of the current token

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    reference = sum(token_loss_sum(logits_of(torch.tensor([s])), torch.tensor([s])) for s in seqs) / glt
    groups = [[0, 3], [1, 2], [4], [5]]  # e.g. two ranks with two micro-batches each
    total = torch.zeros(())
    for g in groups:
        mb = PackedCollator()([{"input_ids": seqs[i]} for i in g], _spec(g, [seqs[i] for i in g], glt))
        total = total + packed_loss(logits_of(mb["input_ids"]), mb)
    assert torch.allclose(total, reference)
    padded = PaddedCollator()([{"input_ids": s} for s in seqs], _spec(list(range(6)), seqs, glt))
    assert torch.allclose(packed_loss(logits_of(padded["input_ids"]), padded), reference)
    packed = PackedCollator()([{"input_ids": s} for s in seqs], _spec(list(range(6)), seqs, glt))
    shards = [cp_shard(packed, 2, r) for r in range(2)]
    assert torch.allclose(sum(packed_loss(logits_of(sh["input_ids"]), sh) for sh in shards), reference)


def test_normalize_scales_for_averaging_frameworks() -> None:
    x = torch.tensor(12.0)
    assert normalize(x, 6).item() == 2.0
    assert normalize(x, 6, grad_divisor=4).item() == 8.0
    assert normalize(x, 0).item() == 0.0
    with pytest.raises(ValueError, match="grad_divisor=0"):
        normalize(x, 6, grad_divisor=0)
    with pytest.raises(ValueError, match="global_loss_tokens=-1"):
        normalize(x, -1)


def test_empty_inputs_keep_the_graph() -> None:
    logits = torch.zeros(1, 1, 5, requires_grad=True)
    loss = token_loss_sum(logits, torch.tensor([[3]]))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None
    with pytest.raises(ValueError, match="disagree"):
        token_loss_sum(torch.zeros(1, 3, 5), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="disagree"):
        target_loss_sum(torch.zeros(1, 3, 5), torch.zeros(1, 2, dtype=torch.long))
