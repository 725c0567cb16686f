"""hf_packed_inputs: every packed sequence's logits equal its unpacked run, for each attention implementation.

Tiny randomly initialised decoders (nothing downloaded), fp32: Llama (full attention),
Qwen2 with one full and one sliding-window layer (a per-layer-type mask mapping) and
Mistral with a sliding window on every layer. Sequences are longer than the windows, so
a mask without the window would fail these tests (checked too). On a CUDA machine the
same tests run on the GPU, plus flash-attention varlen when flash-attn is installed.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from dataloader import HFPackingError, PackedCollator, block_causal_mask, hf_packed_inputs, packed_loss  # noqa: E402
from dataloader.collate import cp_shard  # noqa: E402
from dataloader.loss import token_loss_sum  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 97
WINDOW = 4
TOL = 1e-5
ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2-mixed-sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                            {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
}
LENGTHS = (6, 1, 11, 4, 9)


@functools.cache
def tiny_model(arch: str, impl: str) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation=impl, **extra,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).to(DEVICE).eval()


def packed(lengths: tuple[int, ...], seed: int = 1) -> tuple[list[list[int]], dict[str, Any]]:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, VOCAB, size=n).tolist() for n in lengths]
    mb = PackedCollator()([{"input_ids": s} for s in seqs])
    return seqs, {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}


def max_diff_to_unpacked(model: torch.nn.Module, seqs: list[list[int]], logits: torch.Tensor) -> float:
    """Largest |packed − unpacked| logit over all sequences (each unpacked run alone, no cache)."""
    pieces = logits[0].split([len(s) for s in seqs])
    diffs = [
        (piece - model(input_ids=torch.tensor([s], device=DEVICE), use_cache=False).logits[0]).abs().max().item()
        for s, piece in zip(seqs, pieces)
    ]
    return max(diffs)


def test_models_of_one_architecture_share_their_weights() -> None:
    """The flex test compares with the sdpa model's unpacked runs: same weights, another kernel."""
    for a, b in zip(tiny_model("llama", "flex_attention").parameters(), tiny_model("llama", "sdpa").parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# exactness
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_logits_equal_unpacked(arch: str, impl: str) -> None:
    model = tiny_model(arch, impl)
    seqs, mb = packed(LENGTHS)
    with torch.no_grad():
        exact = max_diff_to_unpacked(model, seqs, model(**hf_packed_inputs(mb, model)).logits)
        # The test can fail: without the segments (plain causal) sequences attend to each other.
        leaky = max_diff_to_unpacked(model, seqs, model(input_ids=mb["input_ids"], use_cache=False).logits)
    assert exact <= TOL
    assert leaky > 1e-3


@pytest.mark.parametrize("arch", ["qwen2-mixed-sliding", "mistral-sliding"])
def test_sliding_window_is_part_of_the_mask(arch: str) -> None:
    """Sequences longer than the window: a full block-causal mask would not match the model."""
    model = tiny_model(arch, "sdpa")
    seqs, mb = packed(LENGTHS)
    kwargs = hf_packed_inputs(mb, model)
    kwargs["attention_mask"] = block_causal_mask(mb["cu_seqlens"], torch.bool, device=DEVICE)  # no window
    with torch.no_grad():
        assert max_diff_to_unpacked(model, seqs, model(**kwargs).logits) > 1e-3


def test_mixed_layer_kinds_get_a_mask_per_kind_unless_no_sequence_reaches_the_window() -> None:
    model = tiny_model("qwen2-mixed-sliding", "sdpa")
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    _, long_mb = packed(LENGTHS)
    assert set(hf_packed_inputs(long_mb, model)["attention_mask"]) == {"full_attention", "sliding_attention"}
    _, short_mb = packed((WINDOW, 2, WINDOW))
    assert isinstance(hf_packed_inputs(short_mb, model)["attention_mask"], torch.Tensor)


@pytest.mark.skipif(not transformers.utils.is_torch_flex_attn_available(), reason="flex attention needs torch >= 2.5")
@pytest.mark.parametrize("arch", ["llama", "qwen2-mixed-sliding"])
def test_flex_attention_packed_logits_equal_unpacked(arch: str) -> None:
    # ~10 s per architecture on CPU: inductor compiles the flex kernel once per shape, so the
    # unpacked runs (one shape per length) use the sdpa model with the same weights. Forward
    # only: torch has no flex-attention backward on CPU.
    model = tiny_model(arch, "flex_attention")
    seqs, mb = packed(LENGTHS)
    with torch.no_grad():
        logits = model(**hf_packed_inputs(mb, model)).logits
        assert max_diff_to_unpacked(tiny_model(arch, "sdpa"), seqs, logits) <= TOL


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_gradients_equal_unpacked(impl: str) -> None:
    """The packed micro-batch's normalised loss has the gradient of the sequences run one by one."""
    model = tiny_model("qwen2-mixed-sliding", impl).train()
    try:
        seqs, mb = packed(LENGTHS, seed=3)
        model.zero_grad()
        packed_loss(model(**hf_packed_inputs(mb, model)).logits, mb).backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        for s in seqs:
            ids = torch.tensor([s], device=DEVICE)
            loss = token_loss_sum(model(input_ids=ids, use_cache=False).logits, ids) / mb["global_loss_tokens"]
            loss.backward()
        for g, p in zip(got, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 14), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_any_packing_is_exact(lengths: list[int], seed: int) -> None:
    model = tiny_model("mistral-sliding", "sdpa")
    seqs, mb = packed(tuple(lengths), seed)
    with torch.no_grad():
        assert max_diff_to_unpacked(model, seqs, model(**hf_packed_inputs(mb, model)).logits) <= TOL


def test_padding_segment_from_the_collator_is_kept_apart() -> None:
    model = tiny_model("llama", "sdpa")
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, VOCAB, size=n).tolist() for n in (5, 7)]
    mb = PackedCollator(pad_to_multiple_of=8)([{"input_ids": s} for s in seqs])  # 12 tokens + 4 padding
    assert mb["input_ids"].shape[1] == 16
    with torch.no_grad():
        logits = model(**hf_packed_inputs({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                                           for k, v in mb.items()}, model)).logits
    assert max_diff_to_unpacked(model, seqs, logits[:, :12]) <= TOL


def test_an_empty_micro_batch_runs_a_placeholder_with_zero_loss_and_gradient() -> None:
    """An idle rank must still run forward/backward (DDP/FSDP collectives); HF models cannot run 0 tokens."""
    model = tiny_model("llama", "sdpa")
    mb = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in PackedCollator()([]).items()}
    kwargs = hf_packed_inputs(mb, model)
    assert kwargs["input_ids"].shape == (1, 1)
    model.zero_grad()
    loss = packed_loss(model(**kwargs).logits, mb)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------
# what is passed
# ---------------------------------------------------------------------------------------
def test_flash_attention_gets_varlen_kwargs_and_no_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dataloader.hf._flash_available", lambda impl: True)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4)
    config._attn_implementation = "flash_attention_2"
    _, mb = packed(LENGTHS)
    kwargs = hf_packed_inputs(mb, config)
    assert "attention_mask" not in kwargs and kwargs["use_cache"] is False
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["cu_seq_lens_q"].tolist() == kwargs["cu_seq_lens_k"].tolist() == [0, 6, 7, 18, 22, 31]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 11
    assert kwargs["position_ids"] is mb["position_ids"]


def test_eager_mask_is_additive_in_the_model_dtype_and_sdpa_mask_is_boolean() -> None:
    _, mb = packed((3, 2))
    eager = hf_packed_inputs(mb, tiny_model("llama", "eager"))["attention_mask"]
    sdpa = hf_packed_inputs(mb, tiny_model("llama", "sdpa"))["attention_mask"]
    assert eager.dtype == torch.float32 and sdpa.dtype == torch.bool
    assert torch.equal(eager == 0, sdpa)
    half = hf_packed_inputs(mb, tiny_model("llama", "eager"), dtype=torch.bfloat16)["attention_mask"]
    assert half.dtype == torch.bfloat16


def test_wrapped_models_are_unwrapped() -> None:
    model = tiny_model("llama", "sdpa")
    _, mb = packed((3, 2))

    class PeftLike(torch.nn.Module):  # PEFT's PeftModel: forward(*args, **kwargs), get_base_model()
        def __init__(self, base: torch.nn.Module) -> None:
            super().__init__()
            self.base = base

        def get_base_model(self) -> torch.nn.Module:
            return self.base

    for wrapped in (torch.compile(model), PeftLike(model)):
        assert torch.equal(hf_packed_inputs(mb, wrapped)["attention_mask"], hf_packed_inputs(mb, model)["attention_mask"])


# ---------------------------------------------------------------------------------------
# refusals: what cannot be made exact says so
# ---------------------------------------------------------------------------------------
def _config(impl: str | None = "sdpa", **extra: Any) -> Any:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, **extra)
    config._attn_implementation = impl
    return config


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (_config("paged|eager"), "cannot keep packed sequences apart"),
        (_config("kernels-community/flash-attn2"), "cannot keep packed sequences apart"),
        (_config(None), "no attention implementation set"),
        (_config(layer_types=["full_attention", "linear_attention"], num_hidden_layers=2), "linear_attention"),
        (_config(is_encoder_decoder=True), "not a causal decoder"),
    ],
    ids=["paged", "hub-kernel", "unset", "linear-layers", "encoder-decoder"],
)
def test_refuses_configs_it_cannot_make_exact(config: Any, match: str) -> None:
    _, mb = packed((3, 2))
    with pytest.raises(HFPackingError, match=match):
        hf_packed_inputs(mb, config)


@pytest.mark.skipif(transformers.utils.is_flash_attn_2_available(), reason="flash-attn is installed here")
def test_refuses_flash_attention_when_it_is_not_installed() -> None:
    _, mb = packed((3, 2))
    with pytest.raises(HFPackingError, match="not installed.*attn_implementation='sdpa'"):
        hf_packed_inputs(mb, _config("flash_attention_2"))


def test_refuses_a_model_without_position_ids() -> None:
    class NoPositions(torch.nn.Module):
        config = _config()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return input_ids

    _, mb = packed((3, 2))
    with pytest.raises(HFPackingError, match="takes no position_ids"):
        hf_packed_inputs(mb, NoPositions())
    with pytest.raises(HFPackingError, match="has no .config"):
        hf_packed_inputs(mb, torch.nn.Linear(2, 2))


def test_refuses_micro_batches_it_cannot_keep_apart() -> None:
    config = _config()
    _, mb = packed((3, 2))
    with pytest.raises(HFPackingError, match="context-parallel shard"):
        hf_packed_inputs(cp_shard(mb, 2, 0), config)
    with pytest.raises(HFPackingError, match="one packed row"):
        hf_packed_inputs({**mb, "input_ids": mb["input_ids"].repeat(2, 1)}, config)
    with pytest.raises(HFPackingError, match="do not restart"):
        hf_packed_inputs({**mb, "position_ids": torch.arange(5, device=DEVICE)[None]}, config)
    with pytest.raises(HFPackingError, match="lacks"):
        hf_packed_inputs({"input_ids": mb["input_ids"]}, config)


# ---------------------------------------------------------------------------------------
# GPU: flash-attention varlen (runs only where flash-attn and CUDA are present)
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not (torch.cuda.is_available() and transformers.utils.is_flash_attn_2_available()),
                    reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("arch", ["llama", "mistral-sliding"])
def test_flash_attention_2_packed_logits_match_unpacked(arch: str) -> None:
    # flash-attn runs in bf16 only: packed and unpacked runs use different matmul shapes,
    # so they agree to bf16 rounding, far below the cross-sequence leak checked alongside.
    model = tiny_model(arch, "flash_attention_2").to(torch.bfloat16)
    seqs, mb = packed(LENGTHS)
    with torch.no_grad():
        exact = max_diff_to_unpacked(model, seqs, model(**hf_packed_inputs(mb, model)).logits.float())
        leaky = max_diff_to_unpacked(model, seqs, model(input_ids=mb["input_ids"], use_cache=False).logits.float())
    assert exact <= 0.05 < leaky
