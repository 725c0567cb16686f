"""Context-parallel sharding: which tokens of a packed row each cp rank holds.

Causal attention makes the end of a sequence more expensive than its start, so giving
cp rank ``r`` one contiguous quarter would leave the last rank with most of the work.
Instead each sequence is cut into ``2·cp`` nearly equal chunks and rank ``r`` takes
chunk ``r`` (from the head) and chunk ``2·cp−1−r`` (from the tail): every rank then
does the same attention work (the "head+tail" or zig-zag split).

Pure numpy; used by the collator (``dataloader``) and by the runtime's attention
(``strategies.runtime``), so both agree on the layout by construction.
"""

from __future__ import annotations

import numpy as np

__all__ = ["chunk_bounds", "cp_token_index", "cp_local_seqlens"]


def chunk_bounds(length: int, cp: int) -> np.ndarray:
    """Boundaries of the ``2·cp`` chunks of one sequence: int64 array of ``2·cp+1`` offsets.

    Chunk ``k`` is ``[bounds[k], bounds[k+1])``; sizes differ by at most one token (the
    first ``length % (2·cp)`` chunks are one longer). Chunks may be empty when
    ``length < 2·cp``.
    """
    if cp < 1:
        raise ValueError(f"cp={cp} must be >= 1")
    if length < 0:
        raise ValueError(f"length={length} must be >= 0")
    n = 2 * cp
    base, extra = divmod(int(length), n)
    sizes = np.full(n, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def cp_token_index(seq_lens: np.ndarray, cp: int, cp_rank: int) -> np.ndarray:
    """Indices (into the packed row) of the tokens cp rank ``cp_rank`` holds, in order.

    For every sequence, in packing order: its head chunk ``cp_rank`` then its tail chunk
    ``2·cp−1−cp_rank``. With ``cp == 1`` this is ``arange(total)``.
    """
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank={cp_rank} outside 0..{cp - 1}")
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    out: list[np.ndarray] = []
    offset = 0
    for s in seq_lens:
        b = chunk_bounds(int(s), cp)
        head = np.arange(b[cp_rank], b[cp_rank + 1])
        tail_k = 2 * cp - 1 - cp_rank
        tail = np.arange(b[tail_k], b[tail_k + 1])
        out.append(offset + head)
        if tail_k != cp_rank:
            out.append(offset + tail)
        offset += int(s)
    if not out:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(out).astype(np.int64, copy=False)


def cp_local_seqlens(seq_lens: np.ndarray, cp: int, cp_rank: int) -> np.ndarray:
    """Tokens of each sequence held by ``cp_rank`` (head chunk + tail chunk), int64."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    out = np.zeros(len(seq_lens), dtype=np.int64)
    for i, s in enumerate(seq_lens):
        b = chunk_bounds(int(s), cp)
        tail_k = 2 * cp - 1 - cp_rank
        out[i] = (b[cp_rank + 1] - b[cp_rank]) + (b[tail_k + 1] - b[tail_k])
    return out
