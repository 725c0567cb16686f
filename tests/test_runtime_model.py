"""strategies.runtime on one process: the reference GPT, packing, cp segments, batch checks, bucket plans."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import Layout, Replica, Strategy
from strategies.context import cp_local_seqlens, cp_token_index
from strategies.runtime import (
    GPT,
    SINGLE_DEVICE,
    ModelConfig,
    build_segments,
    causal_attention,
    check_micro_batch,
    num_blocks_for,
    plan_buckets,
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


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=0, max_size=6), st.integers(1, 4))
def test_cp_segments_are_causal_prefixes_of_the_rows_held(seq_lens, cp):
    seq_lens = np.array(seq_lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(seq_lens)])[:-1]
    for r in range(cp):
        seg = build_segments(seq_lens, cp, r)
        own = cp_token_index(seq_lens, cp, r)
        assert seg.num_queries == own.size == cp_local_seqlens(seq_lens, cp, r).sum()
        q = seg.q_bounds
        assert q.size == 0 or (q[0, 0] == 0 and q[-1, 1] == seg.num_queries and np.all(q[1:, 0] == q[:-1, 1]))
        for (q_lo, q_hi), (k_lo, k_hi) in zip(seg.q_bounds.tolist(), seg.k_bounds.tolist()):
            rows = own[q_lo:q_hi]
            # the queries are the last q_hi-q_lo keys: lower-right causal = mask by true position
            np.testing.assert_array_equal(rows, np.arange(k_hi - (q_hi - q_lo), k_hi))
            seq = int(np.searchsorted(starts, rows[0], side="right") - 1)
            assert k_lo == starts[seq] and k_hi <= starts[seq] + seq_lens[seq]


@pytest.mark.parametrize("cp", [2, 3])
def test_cp_attention_equals_full_attention(cp):
    seq_lens = np.array([7, 1, 12, 3, 5])
    g = torch.Generator().manual_seed(3)
    t = int(seq_lens.sum())
    q, k, v = (torch.randn(t, n, 8, generator=g) for n in (4, 2, 2))
    full = causal_attention(q, k, v, build_segments(seq_lens))
    out = torch.zeros_like(full)
    for r in range(cp):
        own = torch.from_numpy(cp_token_index(seq_lens, cp, r))
        out[own] = causal_attention(q[own], k, v, build_segments(seq_lens, cp, r))
    torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-6)


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


def test_buckets_of_a_heterogeneous_strategy():
    s = Strategy.from_counts([(Layout(2), 1), (Layout(1), 2)])
    buckets = plan_buckets(s, num_blocks_for([s]))
    assert [(b.ranks, b.blocks, b.replicated) for b in buckets] == [
        ((0, 1, 2, 3), (), True), ((0, 2, 3), (0,), False), ((1, 2, 3), (1,), False)]


@st.composite
def _strategies(draw):
    layouts = draw(st.lists(st.sampled_from([Layout(1), Layout(2), Layout(4), Layout(1, 2), Layout(2, 2)]),
                            min_size=1, max_size=4))
    replicas, nxt = [], 0
    for lay in layouts:
        replicas.append(Replica(lay, tuple(range(nxt, nxt + lay.size))))
        nxt += lay.size
    return Strategy("s", tuple(replicas))


@settings(max_examples=80, deadline=None)
@given(_strategies(), st.integers(0, 2**31 - 1))
def test_split_all_reduce_counts_every_replica_once(strategy, seed):
    """Simulate the buckets: summing the contributions gives Σ over replicas, for every element."""
    rng = np.random.default_rng(seed)
    nb = num_blocks_for([strategy])
    world = strategy.num_ranks
    # per replica, a gradient per block (sharded) and one for the replicated parameters,
    # split into cp partial sums; tp ranks of a replica see the same replicated gradient
    blocks = rng.normal(size=(len(strategy.replicas), nb))
    repl = rng.normal(size=len(strategy.replicas))
    partial_b = np.zeros((world, nb))
    partial_r = np.zeros(world)
    for j, rep in enumerate(strategy.replicas):
        tp, cp = rep.layout.tp, rep.layout.cp
        w = rng.dirichlet(np.ones(cp))
        for c in range(cp):
            for t in range(tp):
                r = rep.rank_at(t, c)
                held = range(t * nb // tp, (t + 1) * nb // tp)
                partial_b[r, list(held)] = w[c] * blocks[j, list(held)]
                partial_r[r] = w[c] * repl[j]
    buckets = plan_buckets(strategy, nb)
    seen = [k for b in buckets for k in b.blocks]
    assert sorted(seen) == list(range(nb))
    for b in buckets:
        for k in b.blocks:
            total = sum(partial_b[r, k] for r in b.ranks)
            assert total == pytest.approx(blocks[:, k].sum())
        if b.replicated:
            contributors = [r for r in b.ranks if strategy.replicas[strategy.replica_index(r)].coords(r)[0] == 0]
            assert sum(partial_r[r] for r in contributors) == pytest.approx(repl.sum())
    assert sum(b.replicated for b in buckets) == 1
