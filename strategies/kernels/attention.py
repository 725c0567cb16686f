"""Causal attention over packed rows: the kernels, and the one place that chooses between them.

The runtime trains with these kernels and calibration (:mod:`balancer.decoder`) times
them: both call :func:`choose_kernel`, so the cost model is fitted on the kernel training
runs. Every kernel computes the same thing: for each segment of an
:class:`~.segments.AttentionSegments`, causal attention of its queries over its keys with
the diagonal at the bottom-right (under context parallelism a chunk's queries are the
last rows of its key range), grouped-query heads (``hq`` a multiple of ``hkv``), scale
``1/sqrt(d)``. The kernels:

=============  ===========================================================  ================
name           what runs                                                    where
=============  ===========================================================  ================
``flash_attn`` ``flash_attn.flash_attn_varlen_func`` (one call per layer)   CUDA, fp16/bf16
``varlen``     ``torch.nn.attention.varlen.varlen_attn`` (torch ≥ 2.10)      CUDA, fp16/bf16
``sdpa``       ``scaled_dot_product_attention`` once per segment, limited   CUDA and CPU,
               to the flash and memory-efficient backends                   any float dtype
=============  ===========================================================  ================

:func:`choose_kernel` is the only place that picks one: on CUDA with fp16/bf16 inputs
``flash_attn`` when importable, else ``varlen`` when torch has it, else ``sdpa``;
everywhere else ``sdpa``. SDPA is never left free to pick its backend: its cuDNN backend
builds an execution plan for every new sequence length (~14 ms each on an H200, and
real data brings new lengths every step), so ``sdpa`` runs under
``sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION])``.

Context-parallel segments (fewer queries than keys) go through the same varlen kernels
with ``cu_seqlens_q`` / ``cu_seqlens_k``: FlashAttention-2's causal mask is aligned to
the bottom-right, which is exactly the chunk-attends-to-its-prefix rule. Before a varlen
kernel is used on a device and dtype, :func:`kernel_support` runs it once on a tiny
problem against :func:`reference_attention` (outputs and gradients) for square
segments, cp segments and grouped-query heads. A case the kernel gets wrong (or
raises on) is then routed explicitly: grouped-query heads by expanding K/V to the query
heads before the call, cp segments through ``sdpa`` (``causal_lower_right``); a kernel
that fails on square segments is not used at all. The outcome is logged and available
from :func:`kernel_support`.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .names import KERNELS
from .segments import AttentionSegments, build_segments

__all__ = [
    "KernelSupport",
    "available_kernels",
    "causal_attention",
    "choose_kernel",
    "kernel_support",
    "reference_attention",
]

log = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


# -- what is installed ------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _flash_attn_func() -> Callable[..., torch.Tensor] | None:
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_varlen_func


@lru_cache(maxsize=1)
def _varlen_func() -> tuple[Callable[..., torch.Tensor], dict[str, Any], bool] | None:
    """torch's ``varlen_attn``, the keyword that makes it causal, and whether it takes ``enable_gqa``.

    torch 2.10 spells causality ``is_causal=True``; later versions ``window_size=(-1, 0)``
    (and add ``enable_gqa``). Detected from the signature, once.
    """
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        log.warning("torch.nn.attention.varlen.varlen_attn has neither window_size nor is_causal; not used")
        return None
    return varlen_attn, causal, "enable_gqa" in params


def available_kernels(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Kernels that can run on ``device`` with inputs of ``dtype``, in order of preference."""
    device = torch.device(device)
    out = []
    if device.type == "cuda" and dtype in _HALF:
        if _flash_attn_func() is not None:
            out.append("flash_attn")
        if _varlen_func() is not None:
            out.append("varlen")
    out.append("sdpa")
    return out


def choose_kernel(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The kernel that runs attention for inputs on ``device`` in ``dtype`` — the one place.

    ``requested``: ``"auto"`` (the first of :func:`available_kernels` whose self-check
    passes on square segments) or a name from :data:`KERNELS`, which must be available.
    Cached per (request, device, dtype).
    """
    return _choose(requested, _device_key(device), dtype)


def _device_key(device: torch.device | str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


@lru_cache(maxsize=None)
def _choose(requested: str, device: str, dtype: torch.dtype) -> str:
    if requested != "auto" and requested not in KERNELS:
        raise ValueError(f"attention kernel {requested!r} is unknown; choose 'auto' or one of {list(KERNELS)}")
    usable = available_kernels(device, dtype)
    if requested != "auto":
        if requested not in usable:
            raise ValueError(
                f"attention kernel {requested!r} cannot run on {device} with {dtype}; "
                f"available there: {usable} (flash_attn and varlen need CUDA and fp16/bf16 inputs); "
                f"ask for 'auto' or one of those"
            )
        return requested
    for name in usable:
        if _support(name, device, dtype).square:
            return name
    raise AssertionError("sdpa is always usable")  # pragma: no cover


# -- the reference ----------------------------------------------------------------------------
def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: AttentionSegments) -> torch.Tensor:
    """Dense masked attention in fp32 over the whole row (the definition the kernels must meet).

    ``q`` (Tq, hq, d), ``k``/``v`` (Tk, hkv, d) → (Tq, hq, d) in ``q.dtype``. Memory is
    O(Tq·Tk): for tests and self-checks only.
    """
    tq, hq, d = q.shape
    mask = torch.zeros(tq, k.shape[0], dtype=torch.bool, device=q.device)
    for q_lo, q_hi, k_lo, k_hi in seg.pairs:
        lq, lk = q_hi - q_lo, k_hi - k_lo
        mask[q_lo:q_hi, k_lo:k_hi] = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    groups = hq // k.shape[1]
    kf = k.float().repeat_interleave(groups, dim=1)  # (Tk, hq, d)
    vf = v.float().repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) / math.sqrt(d)  # (hq, Tq, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without keys (none in practice) → 0
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)


# -- the kernels ------------------------------------------------------------------------------
def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: AttentionSegments) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    groups = q.shape[1] // k.shape[1]
    outs = []
    # never the cuDNN or math backends: cuDNN plans per shape, math materialises the scores
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        for q_lo, q_hi, k_lo, k_hi in seg.pairs:
            qs = q[q_lo:q_hi].transpose(0, 1).unsqueeze(0)  # (1, hq, Lq, d)
            ks = k[k_lo:k_hi].repeat_interleave(groups, dim=1).transpose(0, 1).unsqueeze(0)  # (1, hq, Lk, d)
            vs = v[k_lo:k_hi].repeat_interleave(groups, dim=1).transpose(0, 1).unsqueeze(0)
            lq, lk = q_hi - q_lo, k_hi - k_lo
            if lq == lk:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            else:
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_lower_right(lq, lk))
            outs.append(o.squeeze(0).transpose(0, 1))  # (Lq, hq, d)
    return torch.cat(outs)


def _back_to_back(k: torch.Tensor, v: torch.Tensor, seg: AttentionSegments) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every segment laid out back to back (copies overlapping cp prefixes),
    contiguous (the varlen kernels are checked on contiguous inputs; a no-op when they are)."""
    if seg.k_rows is None:
        return k.contiguous(), v.contiguous()
    return k.index_select(0, seg.k_rows), v.index_select(0, seg.k_rows)


def _expand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    groups = q.shape[1] // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: AttentionSegments, expand: bool) -> torch.Tensor:
    k, v = _back_to_back(k, v, seg)
    if expand:
        k, v = _expand(q, k, v)
    fn = _flash_attn_func()
    assert fn is not None
    return fn(q.contiguous(), k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, causal=True)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: AttentionSegments, expand: bool) -> torch.Tensor:
    found = _varlen_func()
    assert found is not None
    fn, causal, takes_gqa = found
    k, v = _back_to_back(k, v, seg)
    kwargs = dict(causal)
    if expand:
        k, v = _expand(q, k, v)
    elif takes_gqa and k.shape[1] != q.shape[1]:
        kwargs["enable_gqa"] = True
    return fn(q.contiguous(), k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, **kwargs)


_VARLEN_KERNELS = {"flash_attn": _flash_attn, "varlen": _varlen}


def _run(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: AttentionSegments,
         expand: bool = False) -> torch.Tensor:
    if name == "sdpa":
        return _sdpa(q, k, v, seg)
    return _VARLEN_KERNELS[name](q, k, v, seg, expand)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: AttentionSegments,
                     kernel: str = "auto") -> torch.Tensor:
    """Segment-wise causal attention with grouped-query heads.

    ``q`` (Tq, hq, d), ``k``/``v`` (Tk, hkv, d) with ``hq % hkv == 0`` → (Tq, hq, d).
    ``kernel``: ``"auto"`` or a name from :data:`KERNELS` (see :func:`choose_kernel`).
    """
    tq, hq, d = q.shape
    if tq == 0:
        # No local queries (an empty micro-batch, or a cp rank whose chunks are all
        # empty). The output must still depend on k and v: their backward runs the cp
        # all-reduce that the other cp ranks of the group are waiting in.
        return q.new_zeros((0, hq, d)) + 0 * (q.sum() + k.sum() + v.sum())
    name = choose_kernel(kernel, q.device, q.dtype)
    if name == "sdpa":
        return _sdpa(q, k, v, seg)
    support = kernel_support(name, q.device, q.dtype)
    if not seg.square and not support.rect:
        return _sdpa(q, k, v, seg)  # this kernel cannot do cp segments: the explicit fallback
    expand = k.shape[1] != hq and not support.gqa
    return _VARLEN_KERNELS[name](q, k, v, seg, expand)


# -- the self-check ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class KernelSupport:
    """Which cases a kernel computed correctly (outputs and gradients) on a device and dtype."""

    kernel: str
    square: bool
    """Segments with as many queries as keys (no cp)."""
    rect: bool
    """cp segments: fewer queries than keys, causal diagonal at the bottom-right."""
    gqa: bool
    """Fewer K/V heads than query heads passed as they are (else K/V are expanded first)."""
    detail: str
    """What failed, or ``"ok"``."""


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-4)  # a misaligned mask is off by O(1)


def _agrees(name: str, device: torch.device, dtype: torch.dtype, seq_lens: list[int], cp: int,
            hkv: int, expand: bool) -> str | None:
    """``None`` when kernel ``name`` matches the reference on this case, else what went wrong."""
    g = torch.Generator().manual_seed(0)
    hq, d = 4, 64
    segs = [build_segments(np.array(seq_lens), cp, r, device) for r in range(cp)]
    seg = segs[-1]  # the last cp rank: head chunk and tail chunk of very different key lengths
    tk = sum(seq_lens)
    base = [torch.randn(n, h, d, generator=g) for n, h in ((seg.num_queries, hq), (tk, hkv), (tk, hkv))]
    tol = _tolerance(dtype)
    try:
        results = []
        # the first use may come from inside a forward under autocast or no_grad: neither applies here
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for fn in (lambda a, b, c: _run(name, a, b, c, seg, expand),
                       lambda a, b, c: reference_attention(a, b, c, seg)):
                leaves = [x.to(device, dtype).requires_grad_() for x in base]
                out = fn(*leaves)
                weight = torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
                (out.float() * weight).sum().backward()
                results.append([out.detach().float(), *(x.grad.float() for x in leaves)])
    except Exception as e:  # noqa: BLE001 — any failure means "do not use for this case"
        return f"{type(e).__name__}: {str(e)[:200]}"
    for what, got, want in zip(("output", "dq", "dk", "dv"), *results):
        err = float((got - want).abs().max())
        scale = float(want.abs().max()) + 1e-6
        if err > tol * max(1.0, scale):
            return f"{what} differs from the reference by {err:.3g} (scale {scale:.3g})"
    return None


@lru_cache(maxsize=None)
def _support(name: str, device: str, dtype: torch.dtype) -> KernelSupport:
    dev = torch.device(device)
    if name == "sdpa":
        return KernelSupport(name, True, True, True, "ok (per segment, flash/efficient backends)")
    if name not in available_kernels(dev, dtype):
        return KernelSupport(name, False, False, False, f"not available on {dev} with {dtype}")
    square = _agrees(name, dev, dtype, [7, 33, 1, 64], 1, 4, False)
    if square is not None:
        log.warning("attention kernel %s fails its self-check on %s %s (%s); not used", name, dev, dtype, square)
        return KernelSupport(name, False, False, False, f"square: {square}")
    gqa = _agrees(name, dev, dtype, [7, 33, 1, 64], 1, 2, False)
    rect = _agrees(name, dev, dtype, [9, 40, 3, 70], 2, 2, gqa is not None)
    detail = "; ".join(f"{k}: {v}" for k, v in (("gqa", gqa), ("cp", rect)) if v is not None) or "ok"
    if detail != "ok":
        log.warning("attention kernel %s on %s %s: %s — those cases fall back (see strategies.kernels.attention)",
                    name, dev, dtype, detail)
    return KernelSupport(name, True, rect is None, gqa is None, detail)


def kernel_support(name: str, device: torch.device | str, dtype: torch.dtype) -> KernelSupport:
    """Run kernel ``name`` once against :func:`reference_attention` on ``device`` / ``dtype`` (cached)."""
    return _support(name, _device_key(device), dtype)
