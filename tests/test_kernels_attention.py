"""strategies.kernels.attention: every kernel path against the dense masked reference.

Real kernels run where they exist (``sdpa`` on the CPU; ``flash_attn`` / ``varlen`` too when
this test runs on a CUDA machine). The varlen adapters — signature detection, cu_seqlens,
back-to-back cp keys, grouped-query heads, the per-case fallbacks — are also checked on the
CPU against stand-in kernels with the documented varlen semantics (and deliberately broken
ones), so every path is exercised on every machine.
"""

from __future__ import annotations

import functools
import math
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import strategies.kernels.attention as attention
from strategies.context import cp_token_index
from strategies.kernels import (
    available_kernels,
    build_segments,
    causal_attention,
    choose_kernel,
    kernel_support,
    reference_attention,
)


def _cases() -> list[tuple[str, torch.dtype, str]]:
    out = [("cpu", torch.float32, k) for k in available_kernels("cpu", torch.float32)]
    out += [("cpu", torch.bfloat16, k) for k in available_kernels("cpu", torch.bfloat16)]
    if torch.cuda.is_available():
        out += [("cuda", dt, k) for dt in (torch.bfloat16, torch.float32) for k in available_kernels("cuda", dt)]
    return out


def _compare(fn, seq_lens, cp, cp_rank, hkv, device="cpu", dtype=torch.float32, seed=0, hq=4, d=16):
    """Outputs and q/k/v gradients of ``fn`` and of the reference on one cp rank's segments."""
    seg = build_segments(np.array(seq_lens, dtype=np.int64), cp, cp_rank, device)
    g = torch.Generator().manual_seed(seed)
    tk = int(sum(seq_lens))
    base = [torch.randn(n, h, d, generator=g) for n, h in ((seg.num_queries, hq), (tk, hkv), (tk, hkv))]
    results = []
    for f in (fn, reference_attention):
        leaves = [x.to(device, dtype).requires_grad_() for x in base]
        out = f(*leaves, seg)
        (out.float() * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        results.append([out.detach().float().cpu(), *(x.grad.float().cpu() for x in leaves)])
    return results


def _assert_close(results, dtype):
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for what, got, want in zip(("output", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, float(want.abs().max()) if want.numel() else 0.0),
                                   msg=lambda m, w=what: f"{w}: {m}")


lengths = st.lists(st.integers(1, 48), min_size=1, max_size=5)


@pytest.mark.parametrize("device, dtype, kernel", _cases())
@settings(max_examples=15, deadline=None)
@given(seq_lens=lengths, cp=st.integers(1, 3), hkv=st.sampled_from([1, 2, 4]), data=st.data())
def test_every_available_kernel_matches_the_dense_reference(device, dtype, kernel, seq_lens, cp, hkv, data):
    cp_rank = data.draw(st.integers(0, cp - 1))
    fn = lambda q, k, v, seg: causal_attention(q, k, v, seg, kernel)  # noqa: E731
    _assert_close(_compare(fn, seq_lens, cp, cp_rank, hkv, device, dtype), dtype)


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


def test_no_local_queries_keep_keys_and_values_in_the_graph():
    seg = build_segments(np.array([1]), cp=2, cp_rank=1)  # a 1-token sequence: cp rank 1 holds nothing
    q = torch.zeros(0, 4, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 8, requires_grad=True) for _ in range(2))
    out = causal_attention(q, k, v, seg)
    out.sum().backward()
    assert out.shape == (0, 4, 8) and k.grad is not None and v.grad is not None


# -- the one place that chooses -----------------------------------------------------------------
def test_choose_kernel_on_the_cpu():
    assert choose_kernel("auto", "cpu", torch.float32) == "sdpa"
    assert choose_kernel("auto", "cpu", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="cannot run on cpu .* need CUDA and fp16/bf16"):
        choose_kernel("varlen", "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="attention kernel 'cudnn' is unknown"):
        choose_kernel("cudnn", "cpu", torch.float32)


def test_sdpa_is_limited_to_the_flash_and_efficient_backends(monkeypatch):
    from torch.nn.attention import SDPBackend

    seen = []
    real = torch.nn.attention.sdpa_kernel

    def spy(backends, *args, **kwargs):
        seen.append(list(backends))
        return real(backends, *args, **kwargs)

    monkeypatch.setattr(torch.nn.attention, "sdpa_kernel", spy)
    q, k, v = (torch.randn(9, 2, 8) for _ in range(3))
    causal_attention(q, k, v, build_segments(np.array([4, 5])), "sdpa")
    assert seen == [[SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]]


# -- the varlen adapters, against stand-in kernels ------------------------------------------------
def _varlen_semantics(q, k, v, cu_q, cu_k, max_q, max_k, *, top_left=False, gqa=True):
    """What a varlen kernel computes: per segment, causal (bottom-right) attention with GQA."""
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    assert cu_q.dtype == cu_k.dtype == torch.int32
    outs = []
    for i in range(len(cu_q) - 1):
        a, b, c, e = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        qs, ks, vs = q[a:b].float(), k[c:e].float(), v[c:e].float()
        if ks.shape[1] != qs.shape[1]:
            if not gqa:
                raise RuntimeError("number of heads in key/value must equal the query heads")
            ks, vs = (x.repeat_interleave(qs.shape[1] // x.shape[1], 1) for x in (ks, vs))
        lq, lk = b - a, e - c
        mask = torch.ones(lq, lk, dtype=torch.bool).tril(0 if top_left else lk - lq)
        s = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(q.shape[-1])
        outs.append(torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, -math.inf).softmax(-1), vs).to(q.dtype))
    return torch.cat(outs)


def varlen_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0), window_size
    assert enable_gqa == (key.shape[1] != query.shape[1])
    return _varlen_semantics(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)


def varlen_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal
    return _varlen_semantics(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    assert causal
    return _varlen_semantics(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def varlen_top_left(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
    return _varlen_semantics(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, top_left=True)


def varlen_no_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1)):
    return _varlen_semantics(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, gqa=False)


@pytest.fixture
def stand_in(monkeypatch):
    """Install stand-in kernels; every kernel counts as available on the CPU; caches cleared."""

    def install(varlen=None, flash=None):
        if varlen is not None:
            module = types.ModuleType("torch.nn.attention.varlen")
            module.varlen_attn = varlen
            monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", module)
        if flash is not None:
            module = types.ModuleType("flash_attn")
            module.flash_attn_varlen_func = flash
            monkeypatch.setitem(sys.modules, "flash_attn", module)
        installed = [k for k, fake in (("flash_attn", flash), ("varlen", varlen), ("sdpa", True)) if fake]
        monkeypatch.setattr(attention, "available_kernels", lambda device, dtype: installed)
        _clear()

    def _clear():
        for f in (attention._varlen_func, attention._flash_attn_func, attention._choose, attention._support):
            f.cache_clear()

    yield install
    _clear()


@pytest.mark.parametrize("kernel, varlen, flash", [("varlen", varlen_new, None), ("varlen", varlen_old, None),
                                                   ("flash_attn", None, flash_attn_varlen_func)])
def test_varlen_adapters_feed_the_kernel_its_documented_inputs(stand_in, kernel, varlen, flash):
    stand_in(varlen=varlen, flash=flash)
    support = kernel_support(kernel, "cpu", torch.float32)
    assert (support.square, support.rect, support.gqa, support.detail) == (True, True, True, "ok")
    assert choose_kernel("auto", "cpu", torch.float32) == kernel
    fn = lambda q, k, v, seg: causal_attention(q, k, v, seg, kernel)  # noqa: E731
    for seq_lens, cp, hkv in (([5, 17, 1, 30], 1, 2), ([9, 2, 40, 3], 2, 1), ([13, 31], 3, 4)):
        for r in range(cp):
            _assert_close(_compare(fn, seq_lens, cp, r, hkv), torch.float32)


def test_a_kernel_with_the_wrong_cp_alignment_is_bypassed_for_cp_segments(stand_in):
    calls = []

    @functools.wraps(varlen_top_left)  # the adapter reads the signature
    def top_left(*args, **kwargs):
        calls.append(1)
        return varlen_top_left(*args, **kwargs)

    stand_in(varlen=top_left)
    support = kernel_support("varlen", "cpu", torch.float32)
    assert support.square and not support.rect and "cp: output differs" in support.detail
    calls.clear()
    fn = lambda q, k, v, seg: causal_attention(q, k, v, seg, "varlen")  # noqa: E731
    _assert_close(_compare(fn, [9, 2, 40, 3], 2, 1, 2), torch.float32)  # cp: through sdpa
    assert calls == []
    _assert_close(_compare(fn, [9, 2, 40, 3], 1, 0, 2), torch.float32)  # square: through the kernel
    assert calls == [1]


def test_a_kernel_without_grouped_query_heads_gets_expanded_keys(stand_in):
    stand_in(varlen=varlen_no_gqa)
    support = kernel_support("varlen", "cpu", torch.float32)
    assert support.square and support.rect and not support.gqa and "gqa: RuntimeError" in support.detail
    fn = lambda q, k, v, seg: causal_attention(q, k, v, seg, "varlen")  # noqa: E731
    for seq_lens, cp, r in (([7, 20, 2], 1, 0), ([7, 20, 2], 2, 0)):
        _assert_close(_compare(fn, seq_lens, cp, r, hkv=2), torch.float32)


def test_a_kernel_that_fails_on_plain_segments_is_not_chosen(stand_in):
    def broken(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
        return torch.zeros_like(query)

    stand_in(varlen=broken)
    assert not kernel_support("varlen", "cpu", torch.float32).square
    assert choose_kernel("auto", "cpu", torch.float32) == "sdpa"


# -- one choice for training and for calibration -----------------------------------------------
def _counted(fn, calls, name):
    @functools.wraps(fn)  # the varlen adapter reads the signature
    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("varlen, flash, chosen", [(varlen_new, flash_attn_varlen_func, "flash_attn"),
                                                   (varlen_old, None, "varlen"),
                                                   (varlen_top_left, None, "varlen"),  # cp falls back, square runs
                                                   (None, None, "sdpa")])
def test_calibration_and_training_run_the_chosen_kernel(stand_in, varlen, flash, chosen):
    """The decoder ``CostModel.calibrate`` times and the runtime's GPT run the kernel
    :func:`choose_kernel` picks for the device and dtype — the one choice, not two."""
    import warnings

    from balancer import CalibrationWarning, CostModel
    from balancer.decoder import build_decoder, pack_batch
    from balancer.specs import model_preset
    from strategies.runtime import GPT, SINGLE_DEVICE, ModelConfig, check_micro_batch, prepare_micro_batch

    calls: list[str] = []
    stand_in(varlen=varlen and _counted(varlen, calls, "varlen"), flash=flash and _counted(flash, calls, "flash_attn"))
    assert choose_kernel("auto", "cpu", torch.float32) == chosen
    calls.clear()  # the self-check ran the stand-ins

    spec = model_preset("tiny")
    net = build_decoder(spec, torch.device("cpu"), torch.float32)  # attention="auto"
    assert net.attention == chosen
    net(pack_batch([5, 12, 1], spec.vocab_size, torch.device("cpu"), torch.Generator().manual_seed(0))).backward()
    expected = [] if chosen == "sdpa" else [chosen] * spec.num_layers
    assert calls == expected
    calls.clear()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # a handful of tiny micro-batches: the fit is not the point
        cost = CostModel.calibrate(spec, micro_batches=[[16], [32], [8, 8], [4] * 4, [24, 2]], token_capacity=64,
                                   warmup=0, repeats=1, progress=False)
    assert cost.meta["attention"] == chosen
    assert set(calls) == set(expected) and len(calls) == 5 * len(expected)
    calls.clear()

    cfg = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=96)
    model = GPT(cfg)  # attention_kernel "auto", as the engine resolves EngineConfig.attention
    ids = torch.randint(0, cfg.vocab_size, (1, 18), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, [0, 6]] = -100  # each sequence's first label (the model shifts)
    mb = {"input_ids": ids, "labels": labels, "position_ids": torch.cat([torch.arange(6), torch.arange(12)])[None],
          "cu_seqlens": torch.tensor([0, 6, 18], dtype=torch.int32)}
    model(prepare_micro_batch(check_micro_batch(mb, 0, cfg.vocab_size), SINGLE_DEVICE, torch.device("cpu"))).backward()
    assert calls == ([] if chosen == "sdpa" else [chosen] * cfg.num_layers)
