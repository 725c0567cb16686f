"""Collators: the exact packed dict, padding, labels, cp shards, padded rows, and a real HF model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dataloader.collate import ContextParallelCollator, PackedCollator, PaddedCollator, block_causal_mask, cp_shard
from dataloader.loss import target_loss_sum, token_loss_sum
from dataloader.spec import MicroBatchSpec


def _spec(sample_ids, lens, loss, glt, *, cp=1, cp_rank=0):  # type: ignore[no-untyped-def]
    n = len(lens)
    return MicroBatchSpec(
        step=3,
        epoch=0,
        step_in_epoch=3,
        index=0,
        num_micro_batches=1,
        sample_ids=tuple(sample_ids),
        starts=(0,) * n,
        ends=tuple(lens),
        full_lengths=tuple(lens),
        loss_tokens=tuple(loss),
        global_loss_tokens=glt,
        cp=cp,
        cp_rank=cp_rank,
    )


def test_packed_dict_is_exactly_the_contract() -> None:
    samples = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}, {"input_ids": [9, 10]}]
    out = PackedCollator()(samples, _spec([12, 4, 30], [3, 1, 2], [2, 0, 1], glt=100))
    assert set(out) == {
        "input_ids",
        "labels",
        "position_ids",
        "cu_seqlens",
        "max_seqlen",
        "seq_lens",
        "sample_ids",
        "num_loss_tokens",
        "global_loss_tokens",
    }
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert out["input_ids"].dtype == torch.int64
    assert out["labels"].tolist() == [[-100, 6, 7, -100, -100, 10]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert out["cu_seqlens"].dtype == torch.int32
    assert out["cu_seqlens"].tolist() == [0, 3, 4, 6]
    assert out["max_seqlen"] == 3 and isinstance(out["max_seqlen"], int)
    assert out["seq_lens"].tolist() == [3, 1, 2] and out["seq_lens"].dtype == torch.int64
    assert out["sample_ids"].tolist() == [12, 4, 30]
    assert out["num_loss_tokens"] == 3
    assert out["global_loss_tokens"] == 100


def test_dataset_labels_are_respected_but_the_first_token_never_counts() -> None:
    samples = [{"input_ids": [1, 2, 3, 4], "labels": [1, -100, 3, 4]}, {"input_ids": [5, 6], "labels": [5, 6]}]
    out = PackedCollator()(samples)
    assert out["labels"].tolist() == [[-100, -100, 3, 4, -100, 6]]
    assert out["num_loss_tokens"] == 3
    assert out["global_loss_tokens"] == 3  # without a spec the batch is its own global batch


def test_padding_gets_its_own_segment_and_no_loss() -> None:
    out = PackedCollator(pad_to_multiple_of=8, pad_token_id=0)([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    assert out["input_ids"].shape == (1, 8)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 8]
    assert out["seq_lens"].tolist() == [3, 2]
    assert out["num_loss_tokens"] == 3


def test_empty_micro_batch_has_zero_tokens_and_zero_weight() -> None:
    spec = _spec([], [], [], glt=50)
    out = PackedCollator(pad_to_multiple_of=4)([], spec)
    assert out["input_ids"].shape == (1, 0)
    assert out["cu_seqlens"].tolist() == [0]
    assert out["num_loss_tokens"] == 0 and out["global_loss_tokens"] == 50
    logits = torch.zeros(1, 0, 7, requires_grad=True)
    assert token_loss_sum(logits, out["labels"]).item() == 0.0


def test_length_and_loss_mismatches_name_the_sample() -> None:
    with pytest.raises(ValueError, match="sample 9 has 2 tokens in the micro-batch but the plan expects 3"):
        PackedCollator()([{"input_ids": [1, 2]}], _spec([9], [3], [2], glt=2))
    masked = [{"input_ids": [1, 2, 3], "labels": [-100, -100, 3]}]
    with pytest.raises(ValueError, match="sample 7 has 1 loss tokens .* plan counted 2"):
        PackedCollator()(masked, _spec([7], [3], [2], glt=2))
    with pytest.raises(ValueError, match="no field 'input_ids'"):
        PackedCollator()([{"tokens": [1]}])


@settings(max_examples=40, deadline=None)
@given(
    lens=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    cp=st.sampled_from([1, 2, 4]),
    pad=st.sampled_from([1, 8]),
)
def test_cp_shards_cover_the_row_once_and_keep_every_target(lens: list[int], cp: int, pad: int) -> None:
    rng = np.random.default_rng(sum(lens))
    samples = [{"input_ids": rng.integers(0, 50, size=n).tolist()} for n in lens]
    packed = PackedCollator(pad_to_multiple_of=pad)(samples)
    total = packed["input_ids"].shape[1]
    seen = np.zeros(total, dtype=np.int64)
    targets = torch.cat([packed["labels"][0, 1:], torch.tensor([-100])])
    loss_tokens = 0
    for r in range(cp):
        shard = cp_shard(packed, cp, r)
        idx = shard["token_index"].numpy()
        seen[idx] += 1
        assert shard["input_ids"][0].tolist() == packed["input_ids"][0, idx].tolist()
        assert shard["target_ids"][0].tolist() == targets[idx].tolist()
        assert shard["position_ids"][0].tolist() == packed["position_ids"][0, idx].tolist()
        assert int(shard["cu_seqlens"][-1]) == idx.size
        loss_tokens += shard["num_loss_tokens"]
    assert seen.tolist() == [1] * total
    assert loss_tokens == packed["num_loss_tokens"]


def test_cp_loss_of_shards_adds_up_to_the_packed_loss() -> None:
    torch.manual_seed(0)
    samples = [{"input_ids": list(range(1, n + 1))} for n in (7, 3, 12)]
    packed = PackedCollator()(samples)
    logits = torch.randn(1, packed["input_ids"].shape[1], 16)
    whole = token_loss_sum(logits, packed["labels"])
    parts = sum(target_loss_sum(logits[:, cp_shard(packed, 2, r)["token_index"]], cp_shard(packed, 2, r)["target_ids"]) for r in range(2))
    assert torch.allclose(whole, parts)


def test_context_parallel_collator_uses_the_spec_coordinates() -> None:
    samples = [{"input_ids": list(range(10))}, {"input_ids": list(range(6))}]
    spec = _spec([0, 1], [10, 6], [9, 5], glt=14, cp=2, cp_rank=1)
    out = ContextParallelCollator()(samples, spec)
    assert out["cp"] == 2 and out["cp_rank"] == 1
    assert out["input_ids"].shape[1] == 8  # 16 tokens, already a multiple of 2·cp, half each


def test_padded_collator_rows_and_mask() -> None:
    out = PaddedCollator(pad_to_multiple_of=4)([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, 2, 3, -100], [-100, -100, -100, -100]]
    assert out["num_loss_tokens"] == 2


def test_block_causal_mask() -> None:
    m = block_causal_mask(torch.tensor([0, 2, 3], dtype=torch.int32))[0, 0]
    allowed = (m == 0).int().tolist()
    assert allowed == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6), window=st.one_of(st.none(), st.integers(1, 6)))
def test_block_causal_mask_matches_its_definition(lengths: list[int], window: int | None) -> None:
    """Allowed iff same segment, key not after query, and (with a window) fewer than `window` tokens back."""
    cu = np.concatenate([[0], np.cumsum(lengths)])
    segment = np.repeat(np.arange(len(lengths)), lengths)
    total = int(cu[-1])
    want = np.array([[segment[q] == segment[k] and k <= q and (window is None or q - k < window)
                      for k in range(total)] for q in range(total)], dtype=bool).reshape(total, total)
    allowed = block_causal_mask(cu, torch.bool, sliding_window=window)[0, 0].numpy()
    additive = block_causal_mask(torch.tensor(cu, dtype=torch.int32), torch.float64, sliding_window=window)[0, 0]
    assert np.array_equal(allowed, want)
    assert np.array_equal((additive == 0).numpy(), want)
    assert bool((additive[~torch.from_numpy(want)] == torch.finfo(torch.float64).min).all())


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_tiny_llama_packed_loss_equals_unpacked(impl: str) -> None:
    """A packed micro-batch with position_ids gives the same summed loss as the sequences one by one.

    transformers >= 4.54 derives the per-sequence mask from restarting position_ids when no
    attention mask is given (sdpa and eager); older versions need the explicit 4-D
    block-diagonal mask from ``block_causal_mask``, which is checked here too.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, masking_utils

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation=impl,
    )
    model = LlamaForCausalLM(cfg).eval()
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 97, size=n).tolist() for n in (6, 1, 11, 4)]
    mb = PackedCollator()([{"input_ids": s} for s in seqs])
    with torch.no_grad():
        reference = sum(
            token_loss_sum(model(input_ids=torch.tensor([s]), use_cache=False).logits, torch.tensor([s])) for s in seqs
        )
        masked = model(
            input_ids=mb["input_ids"],
            position_ids=mb["position_ids"],
            attention_mask=block_causal_mask(mb["cu_seqlens"]),
            use_cache=False,
        ).logits
        assert torch.allclose(token_loss_sum(masked, mb["labels"]), reference, rtol=1e-5)
        crossing = model(input_ids=mb["input_ids"], use_cache=False).logits  # attention across sequences
        assert not torch.allclose(token_loss_sum(crossing, mb["labels"]), reference, rtol=1e-5)
        if hasattr(masking_utils, "find_packed_sequence_indices"):
            by_positions = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
            assert torch.allclose(token_loss_sum(by_positions, mb["labels"]), reference, rtol=1e-5)


def test_negative_token_ids_and_labels_name_the_sample() -> None:
    spec = MicroBatchSpec(step=0, epoch=0, step_in_epoch=0, index=0, num_micro_batches=1, sample_ids=(7, 9),
                          starts=(0, 0), ends=(3, 2), full_lengths=(3, 2), loss_tokens=(2, 1), global_loss_tokens=3)
    with pytest.raises(ValueError, match=r"sample 9: 'input_ids' has -5 at position 1; token ids are >= 0"):
        PackedCollator()([{"input_ids": [1, 2, 3]}, {"input_ids": [4, -5]}], spec)
    with pytest.raises(ValueError, match=r"sample 7: 'labels' has -1 at position 2; labels are token ids >= 0 or -100"):
        PackedCollator()([{"input_ids": [1, 2, 3], "labels": [1, 2, -1]}, {"input_ids": [4, 5], "labels": [4, 5]}], spec)
    out = PackedCollator()([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}], spec)
    assert out["labels"][0].tolist() == [-100, 2, 3, -100, 5]
