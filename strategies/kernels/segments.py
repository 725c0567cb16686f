"""Where causal attention may look inside a packed row: the *segments* of one micro-batch.

The host describes the attention of one micro-batch on one rank as segments: a
contiguous run of this rank's query rows ``[q_lo, q_hi)`` attending to key rows
``[k_lo, k_hi)`` with the causal diagonal aligned to the bottom-right corner (the
queries are the last ``q_hi − q_lo`` positions of the key range). Without context
parallelism there is one segment per sequence (queries = keys = the sequence).
With context parallelism each sequence's local tokens are its head chunk and its tail
chunk (:func:`strategies.context.cp_token_index`), and each chunk attends to the
sequence's prefix up to the chunk's end — the causal mask by true positions, with the
keys taken from the all-gathered (packed-row order) K/V.

Everything a kernel needs is built here once per micro-batch, on the host and then
moved to the device in one go — never per layer: the varlen kernels' ``cu_seqlens_q`` /
``cu_seqlens_k`` (int32), the longest query and key run, and under cp the key rows
laid out back to back per segment (a sequence's head and tail chunk share its prefix,
so their key ranges overlap and are copied apart with one ``index_select``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from strategies.context import chunk_bounds

__all__ = ["AttentionSegments", "build_segments"]


@dataclass(frozen=True, slots=True, eq=False)
class AttentionSegments:
    """Attention layout of one micro-batch on one rank (all offsets in tokens)."""

    q_bounds: np.ndarray
    """int64 (n_seg, 2): query rows ``[q_lo, q_hi)`` of each segment, into this rank's rows."""
    k_bounds: np.ndarray
    """int64 (n_seg, 2): key rows ``[k_lo, k_hi)`` of each segment, into the key tensor."""
    num_queries: int
    """Query rows on this rank (the segments cover ``0 .. num_queries`` in order)."""
    num_keys: int
    """Rows of the key tensor (the whole packed row under cp, else ``num_queries``)."""
    max_q: int
    """Longest query run of a segment (tokens)."""
    max_k: int
    """Longest key run of a segment (tokens)."""
    cu_q: torch.Tensor
    """int32 (n_seg + 1,) on the device: query offsets of the segments (``cu_seqlens_q``)."""
    cu_k: torch.Tensor
    """int32 (n_seg + 1,) on the device: offsets of the segments' keys laid out back to back."""
    k_rows: torch.Tensor | None
    """int64 on the device: key-tensor row of each back-to-back key (``None`` when the keys
    already lie back to back, i.e. the segments' key ranges are the query ranges)."""
    pairs: tuple[tuple[int, int, int, int], ...]
    """``(q_lo, q_hi, k_lo, k_hi)`` of every segment, as Python ints (per-segment kernels)."""

    @property
    def square(self) -> bool:
        """Every segment has as many queries as keys (no context parallelism)."""
        return self.k_rows is None


def build_segments(
    seq_lens: np.ndarray, cp: int = 1, cp_rank: int = 0, device: torch.device | str = "cpu"
) -> AttentionSegments:
    """Segments of a packed row of sequences ``seq_lens`` (tokens) for cp rank ``cp_rank``.

    Local rows follow :func:`strategies.context.cp_token_index`: per sequence its head
    chunk ``cp_rank`` then its tail chunk ``2·cp−1−cp_rank``; keys index the full row.
    Empty chunks produce no segment. The kernel tensors are put on ``device``.
    """
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    q: list[tuple[int, int]] = []
    k: list[tuple[int, int]] = []
    local = 0
    offset = 0
    for s in seq_lens.tolist():
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
    q_len = qa[:, 1] - qa[:, 0]
    k_len = ka[:, 1] - ka[:, 0]
    cu = np.zeros((2, len(qa) + 1), dtype=np.int32)
    cu[0, 1:] = np.cumsum(q_len)
    cu[1, 1:] = np.cumsum(k_len)
    square = cp == 1
    host = [torch.from_numpy(cu)]
    if not square:
        host.append(torch.from_numpy(np.concatenate([np.arange(lo, hi) for lo, hi in ka.tolist()] or [np.zeros(0)])
                                     .astype(np.int64)))
    moved = [t.to(device, non_blocking=True) for t in host]
    return AttentionSegments(
        q_bounds=qa,
        k_bounds=ka,
        num_queries=local,
        num_keys=offset if not square else local,
        max_q=int(q_len.max()) if len(qa) else 0,
        max_k=int(k_len.max()) if len(ka) else 0,
        cu_q=moved[0][0],
        cu_k=moved[0][1],
        k_rows=None if square else moved[1],
        pairs=tuple((int(a), int(b), int(c), int(d)) for (a, b), (c, d) in zip(qa.tolist(), ka.tolist())),
    )
