"""The over-long policy: samples above ``max_length`` tokens become pieces (or errors, or drops).

``truncate`` keeps a sample's first ``max_length`` tokens; ``split`` cuts it into pieces of
at most ``max_length`` tokens overlapping by one (piece ``j`` starts at ``j·(max_length−1)``),
so every next-token target is trained exactly once; ``drop`` leaves it out; ``error``
refuses. :class:`Pieces` holds the result as flat arrays: a sample's first piece keeps the
sample id, later pieces get ids ``len(dataset) + k``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from balancer.validation import check_loss_token_range

__all__ = ["OVERLONG_POLICIES", "Pieces", "build_pieces", "check_loss_tokens", "describe_cuts"]

OVERLONG_POLICIES = ("error", "truncate", "split", "drop")


def check_loss_tokens(loss_tokens: np.ndarray | Sequence[int], lengths: np.ndarray) -> np.ndarray:
    """``int64[n]`` loss tokens per sample, each in ``0 .. length − 1`` (the first token carries none)."""
    arr = np.asarray(loss_tokens)
    if arr.shape != lengths.shape:
        raise ValueError(f"loss_tokens has shape {arr.shape} but there are {lengths.size} samples; give one count per sample")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"loss_tokens must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    check_loss_token_range(arr, lengths, np.arange(arr.size))
    return arr



@dataclass(frozen=True)
class Pieces:
    """Per-sample pieces after the over-long policy (piece id = sample id for the first piece)."""

    kept: np.ndarray  # int64[k] sample ids that take part in epochs
    first_len: np.ndarray  # int64[n] tokens of the first piece
    first_loss: np.ndarray  # int64[n] loss tokens of the first piece
    sample_tokens: np.ndarray  # int64[n] tokens over all pieces of the sample
    extra_offset: np.ndarray  # int64[n+1] range of the sample's extra pieces
    extra_sample: np.ndarray  # int64[e]
    extra_start: np.ndarray  # int64[e]
    extra_end: np.ndarray  # int64[e]
    extra_loss: np.ndarray  # int64[e]


def build_pieces(
    lengths: np.ndarray,
    loss_tokens: np.ndarray,
    cap: int,
    policy: str,
    stats: Any,
    piece_loss_tokens: Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> Pieces:
    """Apply the over-long ``policy`` at ``cap`` tokens; count what it did in ``stats``.

    ``stats`` is a :class:`~dataloader.sampler.SamplerStats` (its over-long fields are
    set). ``piece_loss_tokens(sample_id, starts, ends)`` counts the loss tokens of the
    pieces of a cut sample whose ``loss_tokens`` is custom (not ``length − 1``).
    """
    n = lengths.size
    over = lengths > cap
    if over.any() and policy == "error":
        i = int(np.flatnonzero(over)[0])
        raise ValueError(
            f"sample {i} has {int(lengths[i])} tokens, above the largest capacity {cap} "
            f"({int(over.sum())} sample(s) too long in all); raise the capacity (more tp/cp, more memory) or use "
            "overlong='truncate', 'split' or 'drop'"
        )
    first_len = np.minimum(lengths, cap) if policy in ("truncate", "split") else lengths.copy()
    first_loss = loss_tokens.copy()
    kept = np.arange(n, dtype=np.int64)
    e_sample = np.zeros(0, dtype=np.int64)
    e_start = e_end = e_loss = e_sample
    counts = np.zeros(n, dtype=np.int64)
    if policy == "drop":
        kept = np.flatnonzero(~over).astype(np.int64)
        stats.dropped_overlong = int(over.sum())
        stats.dropped_overlong_ids = np.flatnonzero(over)[:16].tolist()
    elif policy in ("truncate", "split") and over.any():
        ids = np.flatnonzero(over)
        if policy == "split":
            counts[ids] = -(-(lengths[ids] - cap) // (cap - 1))  # extra pieces per sample
            e_sample = np.repeat(ids, counts[ids])
            within = np.arange(e_sample.size) - np.repeat(np.cumsum(counts[ids]) - counts[ids], counts[ids])
            e_start = (within + 1) * (cap - 1)
            e_end = np.minimum(lengths[e_sample], e_start + cap)
            stats.split, stats.extra_pieces = int(ids.size), int(e_sample.size)
        else:
            stats.truncated = int(ids.size)
            stats.truncated_tokens = int((lengths[ids] - cap).sum())
        first_loss[ids] = first_len[ids] - 1
        e_loss = e_end - e_start - 1
        custom = ids[loss_tokens[ids] != lengths[ids] - 1]
        if custom.size:
            first_loss, e_loss = _custom_piece_loss(
                custom, policy, lengths, first_len, first_loss, e_sample, e_start, e_end, e_loss, piece_loss_tokens
            )
    stats.num_kept = int(kept.size)
    offset = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offset[1:])
    sample_tokens = first_len + np.bincount(e_sample, weights=e_end - e_start, minlength=n).astype(np.int64)
    return Pieces(kept, first_len, first_loss, sample_tokens, offset, e_sample, e_start, e_end, e_loss)


def _custom_piece_loss(
    differs: np.ndarray,
    policy: str,
    lengths: np.ndarray,
    first_len: np.ndarray,
    first_loss: np.ndarray,
    e_sample: np.ndarray,
    e_start: np.ndarray,
    e_end: np.ndarray,
    e_loss: np.ndarray,
    piece_loss_tokens: Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss tokens of the pieces of over-long samples whose labels mask some tokens (read from the data)."""
    if piece_loss_tokens is None:
        i = int(differs[0])
        raise ValueError(
            f"sample {i} is over-long ({int(lengths[i])} tokens) and has a custom loss-token count; "
            f"overlong={policy!r} needs piece_loss_tokens=... to count its pieces' loss tokens "
            "(BalancedDataLoader supplies one from the dataset's labels)"
        )
    first_loss, e_loss = first_loss.copy(), e_loss.copy()
    for i in differs.tolist():
        lo, hi = np.searchsorted(e_sample, [i, i + 1])
        starts = np.concatenate([[0], e_start[lo:hi]])
        ends = np.concatenate([[first_len[i]], e_end[lo:hi]])
        got = np.asarray(piece_loss_tokens(int(i), starts, ends), dtype=np.int64)
        first_loss[i] = got[0]
        e_loss[lo:hi] = got[1:]
    return first_loss, e_loss


def describe_cuts(stats: Any, policy: str, max_length: int) -> str | None:
    """One line saying what the over-long policy did (``None`` when it did nothing)."""
    parts = []
    if stats.dropped_overlong:
        parts.append(f"dropped {stats.dropped_overlong} sample(s) (e.g. ids {stats.dropped_overlong_ids[:4]})")
    if stats.truncated:
        parts.append(f"truncated {stats.truncated} sample(s), losing {stats.truncated_tokens} tokens")
    if stats.split:
        parts.append(
            f"split {stats.split} sample(s) into {stats.split + stats.extra_pieces} pieces (no attention across pieces)"
        )
    if not parts:
        return None
    return f"overlong={policy!r} with max_length={max_length} tokens: " + "; ".join(parts)
