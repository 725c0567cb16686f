"""Causal attention over a packed row that never crosses a sequence boundary.

The host describes the attention of one micro-batch on one rank as *segments*: a
contiguous run of this rank's query rows ``[q_lo, q_hi)`` attending to key rows
``[k_lo, k_hi)`` with the causal diagonal aligned to the bottom-right corner (the
queries are the last ``q_hi − q_lo`` positions of the key range). Without context
parallelism there is one segment per sequence (queries = keys = the sequence).
With context parallelism each sequence's local tokens are its head chunk and its tail
chunk (:func:`strategies.context.cp_token_index`), and each chunk attends to the
sequence's prefix up to the chunk's end — the causal mask by true positions, with the
keys taken from the all-gathered (packed-row order) K/V.

Kernels: ``flash_attn.flash_attn_varlen_func`` when importable, on CUDA, in fp16/bf16
(segments become ``cu_seqlens_q`` / ``cu_seqlens_k``); otherwise
``torch.nn.functional.scaled_dot_product_attention`` once per segment, with a
lower-right causal bias where queries and keys differ in length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from strategies.context import chunk_bounds

__all__ = ["AttentionSegments", "build_segments", "causal_attention", "flash_attention_available"]


@dataclass(frozen=True, slots=True)
class AttentionSegments:
    """Host-side attention layout of one micro-batch on one rank (all offsets in tokens)."""

    q_bounds: np.ndarray
    """int64 (n_seg, 2): query rows ``[q_lo, q_hi)`` of each segment, into this rank's rows."""
    k_bounds: np.ndarray
    """int64 (n_seg, 2): key rows ``[k_lo, k_hi)`` of each segment, into the key tensor."""
    num_queries: int
    """Query rows on this rank (the segments cover ``0 .. num_queries`` in order)."""
    num_keys: int
    """Rows of the key tensor (the whole packed row under cp, else ``num_queries``)."""

    @property
    def max_q(self) -> int:
        return int((self.q_bounds[:, 1] - self.q_bounds[:, 0]).max()) if len(self.q_bounds) else 0

    @property
    def max_k(self) -> int:
        return int((self.k_bounds[:, 1] - self.k_bounds[:, 0]).max()) if len(self.k_bounds) else 0


def build_segments(seq_lens: np.ndarray, cp: int = 1, cp_rank: int = 0) -> AttentionSegments:
    """Segments of a packed row of sequences ``seq_lens`` (tokens) for cp rank ``cp_rank``.

    Local rows follow :func:`strategies.context.cp_token_index`: per sequence its head
    chunk ``cp_rank`` then its tail chunk ``2·cp−1−cp_rank``; keys index the full row.
    Empty chunks produce no segment.
    """
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    q: list[tuple[int, int]] = []
    k: list[tuple[int, int]] = []
    local = 0
    offset = 0
    for s in seq_lens:
        s = int(s)
        if cp == 1:
            chunks = [(0, s)]
        else:
            b = chunk_bounds(s, cp)
            tail = 2 * cp - 1 - cp_rank
            chunks = [(int(b[cp_rank]), int(b[cp_rank + 1])), (int(b[tail]), int(b[tail + 1]))]
        for lo, hi in chunks:
            if hi > lo:
                q.append((local, local + hi - lo))
                k.append((offset, offset + hi))  # the sequence's prefix up to the chunk's end
                local += hi - lo
        offset += s
    qa = np.asarray(q, dtype=np.int64).reshape(-1, 2)
    ka = np.asarray(k, dtype=np.int64).reshape(-1, 2)
    return AttentionSegments(q_bounds=qa, k_bounds=ka, num_queries=local, num_keys=offset if cp > 1 else local)


@lru_cache(maxsize=1)
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_varlen_func


def flash_attention_available() -> bool:
    """True when ``flash_attn`` is importable (used only for CUDA fp16/bf16 inputs)."""
    return _flash_varlen() is not None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: AttentionSegments) -> torch.Tensor:
    """Segment-wise causal attention with grouped-query heads.

    ``q`` (Tq, hq, d), ``k``/``v`` (Tk, hkv, d) with ``hq % hkv == 0`` → (Tq, hq, d).
    """
    tq, hq, d = q.shape
    if tq == 0:
        # No local queries (an empty micro-batch, or a cp rank whose chunks are all
        # empty). The output must still depend on k and v: their backward runs the cp
        # all-reduce that the other cp ranks of the group are waiting in.
        return q.new_zeros((0, hq, d)) + 0 * (q.sum() + k.sum() + v.sum())
    flash = _flash_varlen()
    if flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return _flash_path(flash, q, k, v, seg)
    return _sdpa_path(q, k, v, seg)


def _sdpa_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: AttentionSegments) -> torch.Tensor:
    from torch.nn.attention.bias import causal_lower_right

    groups = q.shape[1] // k.shape[1]
    outs = []
    for (q_lo, q_hi), (k_lo, k_hi) in zip(seg.q_bounds.tolist(), seg.k_bounds.tolist()):
        qs = q[q_lo:q_hi].transpose(0, 1).unsqueeze(0)  # (1, hq, Lq, d)
        ks = k[k_lo:k_hi].repeat_interleave(groups, dim=1).transpose(0, 1).unsqueeze(0)  # (1, hq, Lk, d)
        vs = v[k_lo:k_hi].repeat_interleave(groups, dim=1).transpose(0, 1).unsqueeze(0)
        if q_hi - q_lo == k_hi - k_lo:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=causal_lower_right(q_hi - q_lo, k_hi - k_lo))
        outs.append(o.squeeze(0).transpose(0, 1))  # (Lq, hq, d)
    return torch.cat(outs)


def _flash_path(flash, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: AttentionSegments) -> torch.Tensor:
    q_len = seg.q_bounds[:, 1] - seg.q_bounds[:, 0]
    k_len = seg.k_bounds[:, 1] - seg.k_bounds[:, 0]
    cu_q = torch.from_numpy(np.concatenate([[0], np.cumsum(q_len)]).astype(np.int32)).to(q.device, non_blocking=True)
    cu_k = torch.from_numpy(np.concatenate([[0], np.cumsum(k_len)]).astype(np.int32)).to(q.device, non_blocking=True)
    same = bool(np.array_equal(seg.q_bounds, seg.k_bounds)) and seg.num_keys == seg.num_queries
    if not same:  # cp: key ranges overlap (a sequence's two chunks share its prefix) → lay them out back to back
        rows = np.concatenate([np.arange(lo, hi) for lo, hi in seg.k_bounds.tolist()])
        idx = torch.from_numpy(rows).to(q.device, non_blocking=True)
        k, v = k.index_select(0, idx), v.index_select(0, idx)
    return flash(q, k, v, cu_q, cu_k, seg.max_q, seg.max_k, causal=True)
