"""strategies.runtime on one process: the reference GPT, packing, cp segments, batch checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies.runtime import (
    GPT,
    SINGLE_DEVICE,
    ModelConfig,
    check_micro_batch,
    prepare_micro_batch,
    shift_labels,
)

CFG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96)


def _pack(seqs: list[torch.Tensor]) -> dict:
    lens = [len(s) for s in seqs]
    cu = np.concatenate([[0], np.cumsum(lens)])
    ids = torch.cat(seqs)[None] if seqs else torch.zeros(1, 0, dtype=torch.int64)
    labels = ids.clone()
    labels[0, torch.from_numpy(cu[:-1])] = -100
    pos = torch.cat([torch.arange(s) for s in lens])[None] if seqs else torch.zeros(1, 0, dtype=torch.int64)
    return dict(input_ids=ids, labels=labels, position_ids=pos, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def _local(mb: dict):
    return prepare_micro_batch(check_micro_batch(mb, 0, CFG.vocab_size), SINGLE_DEVICE, torch.device("cpu"))


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def test_matches_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    model = _model()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size, intermediate_size=CFG.ffn_hidden_size,
        num_hidden_layers=CFG.num_layers, num_attention_heads=CFG.num_heads, num_key_value_heads=CFG.num_kv_heads,
        rms_norm_eps=CFG.norm_eps, rope_theta=CFG.rope_theta, tie_word_embeddings=False, max_position_embeddings=64,
    )).eval()
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "wq": "self_attn.q_proj",
             "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    state = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.final_norm,
             "lm_head.weight": model.lm_head}
    for i, layer in enumerate(model.layers):
        for ours, theirs in names.items():
            state[f"model.layers.{i}.{theirs}.weight"] = getattr(layer, ours)
    hf.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, CFG.vocab_size, (s,), generator=g) for s in (5, 9, 1, 7)]
    logits = model.logits(_local(_pack(seqs)))
    offset = 0
    with torch.no_grad():
        for s in seqs:
            torch.testing.assert_close(logits[offset : offset + len(s)], hf(s[None]).logits[0], rtol=1e-5, atol=1e-5)
            offset += len(s)


def test_packing_never_crosses_a_sequence():
    model = _model()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, CFG.vocab_size, (s,), generator=g) for s in (6, 1, 11, 4)]
    packed = _local(_pack(seqs))
    total = model(packed)
    alone = [model(_local(_pack([s]))) for s in seqs]
    torch.testing.assert_close(total, sum(alone), rtol=1e-5, atol=1e-5)
    offset = 0
    logits = model.logits(packed)
    for s in seqs:
        alone_logits = model.logits(_local(_pack([s])))
        torch.testing.assert_close(logits[offset : offset + len(s)], alone_logits, rtol=1e-5, atol=1e-5)
        offset += len(s)
    assert packed.num_loss_tokens == sum(len(s) - 1 for s in seqs)


def test_shift_labels_stops_at_boundaries():
    labels = np.array([-100, 5, 6, -100, 7, -100])
    np.testing.assert_array_equal(shift_labels(labels), [5, 6, -100, 7, -100, -100])


def _bad(**change) -> dict:
    mb = _pack([torch.arange(4), torch.arange(3)])
    mb.update(change)
    return mb


@pytest.mark.parametrize(
    "mb, text",
    [
        (_bad(position_ids=torch.arange(7)[None]), "positions must restart at 0"),
        (_bad(labels=torch.tensor([[-100, 1, 2, 3, 0, 1, 2]])), "sequence 1 starts with label 0"),
        (_bad(cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32)), "cu_seqlens must run from 0 to T=7"),
        (_bad(input_ids=torch.tensor([[0, 1, 2, 300, 0, 1, 2]])), "input_ids outside 0..127"),
        (_bad(seq_lens=torch.tensor([3, 4])), "disagree with cu_seqlens"),
        (_bad(sample_ids=torch.tensor([1, 2, 3])), "3 sample_ids for 2 sequences"),
        ({"input_ids": torch.zeros(1, 2, dtype=torch.int64)}, "has no 'labels'"),
    ],
)
def test_check_micro_batch_names_the_problem(mb, text):
    with pytest.raises(ValueError, match=text):
        check_micro_batch(mb, 0, CFG.vocab_size)


def test_accepts_the_dataloaders_padded_rows():
    collate = pytest.importorskip("dataloader.collate")
    samples = [{"input_ids": [1, 2, 3, 4, 5]}, {"input_ids": [6, 7]}]
    mb = collate.PackedCollator(pad_to_multiple_of=4)(samples)
    checked = check_micro_batch(mb, 0, CFG.vocab_size)
    assert checked.num_tokens == 8 and checked.seq_lens.tolist() == [5, 2, 1]
    local = prepare_micro_batch(checked, SINGLE_DEVICE, torch.device("cpu"))
    assert local.num_loss_tokens == mb["num_loss_tokens"] == 5
    loss = _model()(local)
    want = _model()(_local(_pack([torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7])])))
    torch.testing.assert_close(loss, want)  # the padding segment adds nothing


def test_model_config_validates():
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        ModelConfig(vocab_size=8, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=3, ffn_hidden_size=8)
    with pytest.raises(ValueError, match="tp=4 does not divide num_kv_heads=2"):
        CFG.check_tp(4)
