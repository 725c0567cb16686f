"""balancer.specs: validation, presets, lookups, dict round trips."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.specs import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    HardwareSpec,
    ModelSpec,
    hardware_preset,
    model_preset,
)


def _small(**kw) -> ModelSpec:
    base = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_hidden_size=128, vocab_size=100)
    return ModelSpec(**{**base, **kw})


def test_llama_parameter_counts_match_published_models():
    # Hugging Face model cards of meta-llama/Llama-2-{7b,13b,70b}-hf report these totals.
    assert model_preset("llama-7b").num_parameters == 6_738_415_616
    assert model_preset("llama-13b").num_parameters == 13_015_864_320
    assert model_preset("llama-70b").num_parameters == 68_976_648_192


def test_tiny_parameter_count_by_hand():
    m = model_preset("tiny")  # h=128, 4 heads (d=32), 2 KV heads, f=384, V=512, 2 layers
    attention = 128 * 128 + 2 * 128 * 64 + 128 * 128  # Q, K, V (2 heads × 32), output
    mlp = 3 * 128 * 384
    norms = 2 * 128
    assert m.layer_parameters == attention + mlp + norms
    assert m.num_parameters == 512 * 128 + 2 * (attention + mlp + norms) + 128 + 512 * 128
    assert m.replace(tie_embeddings=True).num_parameters == m.num_parameters - 512 * 128


def test_derived_sizes():
    m = model_preset("llama-70b")
    assert (m.head_dim, m.q_size, m.kv_size, m.mlp_matrices) == (128, 8192, 1024, 3)
    assert _small(num_kv_heads=None).num_kv_heads == 4  # None = multi-head attention
    assert _small(gated_mlp=False).mlp_matrices == 2


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_model_preset_round_trip(name):
    spec = model_preset(name)
    assert ModelSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("name", sorted(HARDWARE_PRESETS))
def test_hardware_preset_round_trip(name):
    spec = hardware_preset(name)
    assert HardwareSpec.from_dict(spec.to_dict()) == spec
    assert spec.effective_flops == pytest.approx(spec.peak_flops * spec.mfu)


def test_lookup_is_case_insensitive_and_lists_valid_names():
    assert model_preset("LLaMA-7B") is MODEL_PRESETS["llama-7b"]
    assert hardware_preset(" H100-80G ") is HARDWARE_PRESETS["h100-80g"]
    with pytest.raises(ValueError, match=r"unknown model preset 'gpt-5'.*llama-13b, llama-70b, llama-7b, tiny"):
        model_preset("gpt-5")
    with pytest.raises(ValueError, match=r"unknown hardware preset 'tpu'.*a100-80g, cpu, h100-80g, h200"):
        hardware_preset("tpu")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_layers=-1), r"num_layers=-1 must be a positive integer"),
        (dict(hidden_size=0), r"hidden_size=0 must be a positive integer"),
        (dict(vocab_size=-5), r"vocab_size=-5"),
        (dict(num_layers=2.5), r"num_layers=2.5"),
        (dict(hidden_size=100, num_heads=3), r"num_heads=3 does not divide hidden_size=100.*e\.g\. 2"),
        (dict(num_heads=4, num_kv_heads=3), r"num_kv_heads=3 does not divide num_heads=4.*num_kv_heads=2"),
        (dict(activation_recompute="some"), r"activation_recompute='some' is not one of"),
        (dict(gated_mlp="yes"), r"gated_mlp='yes' must be true or false"),
        (dict(dtype_bytes=0), r"dtype_bytes=0"),
    ],
)
def test_model_spec_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        _small(**changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(peak_flops=-1.0), r"peak_flops=-1.0 must be a finite number > 0"),
        (dict(mfu=1.5), r"mfu=1.5 is a fraction of peak and must be <= 1"),
        (dict(mfu=0.0), r"mfu=0.0 must be a finite number > 0"),
        (dict(memory_bytes=0), r"memory_bytes=0 must be a positive integer"),
        (dict(intra_node_bandwidth=float("inf")), r"intra_node_bandwidth=inf"),
        (dict(ranks_per_node=0), r"ranks_per_node=0"),
        (dict(layer_overhead_seconds=-1e-3), r"layer_overhead_seconds=-0.001 must be a finite number >= 0"),
        (dict(sequence_overhead_seconds=-1e-5), r"sequence_overhead_seconds=-1e-05 must be a finite number >= 0"),
        (dict(source=3), r"source=3 must be a string"),
    ],
)
def test_hardware_spec_rejects_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        hardware_preset("a100-80g").replace(**changes)


def test_measured_presets_say_where_their_figures_come_from():
    h200 = hardware_preset("h200")
    assert "measured on one H200" in h200.source and h200.sequence_overhead_seconds > 0
    assert h200.mfu == pytest.approx(527e12 / 989e12, abs=0.01)  # b = 1.07e-5 s/token on the 4-layer 7B shape
    assert all(hardware_preset(n).sequence_overhead_seconds == 0.0 for n in ("a100-80g", "h100-80g", "cpu"))
    assert HardwareSpec.from_dict(h200.to_dict()) == h200
    old = {k: v for k, v in h200.to_dict().items() if k not in ("sequence_overhead_seconds", "source")}
    assert HardwareSpec.from_dict(old).sequence_overhead_seconds == 0.0  # files written before the field


def test_from_dict_rejects_unknown_keys():
    d = model_preset("tiny").to_dict() | {"num_experts": 8}
    with pytest.raises(ValueError, match=r"unknown keys \['num_experts'\]"):
        ModelSpec.from_dict(d)
    with pytest.raises(ValueError, match=r"unknown keys \['tflops'\]"):
        HardwareSpec.from_dict(hardware_preset("cpu").to_dict() | {"tflops": 1})


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 96),
    kv=st.integers(1, 8),
    group=st.integers(1, 8),
    d=st.sampled_from([16, 32, 64, 128]),
    f=st.integers(1, 50_000),
    v=st.integers(1, 200_000),
    gated=st.booleans(),
    tied=st.booleans(),
    recompute=st.sampled_from(["none", "selective", "full"]),
)
def test_valid_model_specs_round_trip(layers, kv, group, d, f, v, gated, tied, recompute):
    heads = kv * group
    spec = ModelSpec(
        num_layers=layers, hidden_size=heads * d, num_heads=heads, num_kv_heads=kv, ffn_hidden_size=f,
        vocab_size=v, gated_mlp=gated, tie_embeddings=tied, activation_recompute=recompute,
    )
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.num_parameters > spec.num_layers * spec.layer_matrix_parameters
