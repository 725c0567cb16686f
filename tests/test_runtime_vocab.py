"""strategies.runtime.vocab: the vocabulary split over tp — chunks, embedding, cross-entropy, logits.

The multi-process tests run 2 gloo ranks of one tp group on an uneven vocabulary and compare
with the full computation on one process: the loss and the gradients of the hidden state,
the head's and the embedding's shards, with ignored targets and targets in every shard.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.runtime import (
    GPT,
    IGNORE_INDEX,
    ModelConfig,
    ParallelContext,
    check_micro_batch,
    copy_to_tp,
    prepare_micro_batch,
    run_local,
    tp_range,
    tp_shard,
    vocab_parallel_cross_entropy,
    vocab_parallel_embedding,
)

TP = 2
VOCAB, HIDDEN, TOKENS = 11, 8, 14  # uneven: rank 0 owns ids 0..5, rank 1 ids 6..10
TARGETS = [0, 5, 6, 10, IGNORE_INDEX, 3, 8, IGNORE_INDEX, 7, 1, 9, 2, 4, IGNORE_INDEX]  # both shards, ignored
MODEL = ModelConfig(vocab_size=37, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, ffn_hidden_size=32)


# -- the chunks (one process) ---------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 500), st.integers(1, 16))
def test_chunks_partition_the_dim_within_one_larger_first(n, tp):
    ranges = [tp_range(n, tp, r) for r in range(tp)]
    assert [start for start, _ in ranges] == [sum(length for _, length in ranges[:r]) for r in range(tp)]
    assert sum(length for _, length in ranges) == n
    lengths = [length for _, length in ranges]
    assert lengths == sorted(lengths, reverse=True) and max(lengths) - min(lengths) <= 1
    if n % tp == 0:
        assert lengths == [n // tp] * tp  # the even split of heads and MLP columns is unchanged


def test_tp_shard_cuts_an_uneven_vocabulary_like_the_model():
    w = torch.arange(VOCAB * 3.0).view(VOCAB, 3)
    torch.testing.assert_close(torch.cat([tp_shard(w, 0, 3, r) for r in range(3)]), w)
    assert [tp_shard(w, 0, 3, r).shape[0] for r in range(3)] == [4, 4, 3]


def test_embedding_and_head_are_split_by_vocabulary_and_tp_must_not_exceed_it():
    with torch.device("meta"):
        splits = GPT(MODEL).tp_split_dims()
    assert splits["embed"] == 0 and splits["lm_head"] == 0 and splits["final_norm"] is None
    MODEL.check_tp(2)  # 37 rows: 19 | 18
    tiny = ModelConfig(vocab_size=3, hidden_size=8, num_layers=1, num_heads=4, num_kv_heads=4, ffn_hidden_size=8)
    with pytest.raises(ValueError, match=r"tp=4 exceeds vocab_size=3.*at least one vocabulary row"):
        tiny.check_tp(4)


# -- two ranks ------------------------------------------------------------------------------------
def _full_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    head = torch.randn(VOCAB, HIDDEN, generator=gen) * 2.0  # peaked logits: the max matters
    embed = torch.randn(VOCAB, HIDDEN, generator=gen)
    return x, head, embed, torch.tensor(TARGETS)


def _reference() -> dict[str, torch.Tensor]:
    x, head, embed, targets = _full_inputs()
    x.requires_grad_(True)
    head.requires_grad_(True)
    embed.requires_grad_(True)
    loss = F.cross_entropy(F.linear(x, head), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (0.37 * loss).backward()
    rows = F.embedding(targets.clamp(min=0), embed)
    (rows * torch.linspace(-1, 1, HIDDEN)).sum().backward()
    logits = F.linear(x.detach(), head.detach())
    return {"loss": loss.detach(), "x_grad": x.grad, "head_grad": head.grad, "rows": rows.detach(),
            "embed_grad": embed.grad, "logits": logits}


def _worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    pc = ParallelContext(tp_size=world, tp_rank=rank, tp_group=dist.group.WORLD)
    x, head, embed, targets = _full_inputs()
    start, length = tp_range(VOCAB, world, rank)
    x.requires_grad_(True)
    head_shard = head[start : start + length].clone().requires_grad_(True)
    embed_shard = embed[start : start + length].clone().requires_grad_(True)
    local_logits = F.linear(copy_to_tp(x, pc), head_shard)  # (T, V/tp)
    loss = vocab_parallel_cross_entropy(local_logits, targets, pc, VOCAB, IGNORE_INDEX)
    (0.37 * loss).backward()
    rows = vocab_parallel_embedding(targets.clamp(min=0), embed_shard, pc, VOCAB)
    (rows * torch.linspace(-1, 1, HIDDEN)).sum().backward()
    empty = vocab_parallel_cross_entropy(local_logits[:0].detach(), targets[:0], pc, VOCAB, IGNORE_INDEX)
    return {"loss": loss.detach(), "x_grad": x.grad, "head_grad": head_shard.grad, "rows": rows.detach(),
            "embed_grad": embed_shard.grad, "start": torch.tensor(start), "empty": empty,
            "owned": torch.tensor(sum(start <= t < start + length for t in TARGETS))}


def _model_worker(rank: int, world: int) -> dict[str, torch.Tensor]:
    """The whole GPT (full weights, tp views) on ``world`` tp ranks: loss, gradients, gathered logits."""
    pc = ParallelContext(tp_size=world, tp_rank=rank, tp_group=dist.group.WORLD)
    model, batch = _model_and_batch()
    loss = model(batch, pc)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads, "logits": model.logits(batch, pc).detach()}


def _model_and_batch():
    torch.manual_seed(3)
    model = GPT(MODEL)
    seqs = [torch.randint(0, MODEL.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 5, 12)]
    lens = [len(s) for s in seqs]
    cu = np.concatenate([[0], np.cumsum(lens)])
    ids = torch.cat(seqs)[None]
    labels = ids.clone()
    labels[0, torch.from_numpy(cu[:-1])] = IGNORE_INDEX
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    mb = dict(input_ids=ids, labels=labels, position_ids=pos, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    return model, prepare_micro_batch(check_micro_batch(mb, 0, MODEL.vocab_size), ParallelContext(),
                                      torch.device("cpu"))


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, torch.Tensor]]:
    return run_local(_worker, TP, timeout_s=120, collective_timeout_s=30)


def test_vocab_parallel_cross_entropy_equals_the_full_one(ranks):
    ref = _reference()
    assert [int(r["owned"]) for r in ranks] == [6, 5]  # targets in both shards (3 ignored)
    for r in ranks:  # the same loss on every tp rank, equal to F.cross_entropy's
        torch.testing.assert_close(r["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["x_grad"], ref["x_grad"], rtol=1e-6, atol=1e-7)  # all-reduced by copy_to_tp
        start = int(r["start"])
        torch.testing.assert_close(r["head_grad"], ref["head_grad"][start : start + len(r["head_grad"])],
                                   rtol=1e-6, atol=1e-7)
        assert float(r["empty"]) == 0.0  # no tokens on this rank: zero, and the collectives still match
        assert r["x_grad"][[i for i, t in enumerate(TARGETS) if t == IGNORE_INDEX]].abs().sum() == 0


def test_vocab_parallel_embedding_equals_the_full_lookup(ranks):
    ref = _reference()
    for r in ranks:
        torch.testing.assert_close(r["rows"], ref["rows"], rtol=0, atol=0)  # one owner plus zeros: exact
        start = int(r["start"])
        torch.testing.assert_close(r["embed_grad"], ref["embed_grad"][start : start + len(r["embed_grad"])],
                                   rtol=0, atol=0)


def test_the_gpt_under_tp2_equals_one_process_and_gathers_full_logits():
    """Uneven vocabulary (37 = 19 | 18) through the model: embedding, blocks, head, loss, logits."""
    model, batch = _model_and_batch()
    loss = model(batch)
    loss.backward()
    logits = model.logits(batch).detach()
    ranks = run_local(_model_worker, TP, timeout_s=120, collective_timeout_s=30)
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r["logits"], logits, rtol=1e-6, atol=1e-6)
        assert r["logits"].shape == (batch.input_ids.shape[0], MODEL.vocab_size)
    # each rank's gradient lands in its own rows / heads: the ranks' sum is the full gradient
    for name, p in model.named_parameters():
        split = model.tp_split_dims()[name]
        got = ranks[0]["grads"][name] if split is None else sum(r["grads"][name] for r in ranks)
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-7, msg=name)
