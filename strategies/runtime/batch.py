"""From a packed micro-batch (design.md §7) to what one rank runs.

A packed micro-batch is a dict of host tensors: ``input_ids``, ``labels`` and
``position_ids`` (1, T); ``cu_seqlens`` int32 (n+1,); optional ``seq_lens``,
``sample_ids``, ``max_seqlen``, ``num_loss_tokens``, ``global_loss_tokens``. A row padded to a
multiple (``PackedCollator(pad_to_multiple_of=...)``) has one extra trailing segment in
``cu_seqlens`` (not in ``seq_lens``), all labels −100. Labels follow
the Hugging Face convention (labels = input ids, the model shifts, the first token of
every sequence is −100), so shifting the whole row by one never lets a sequence predict
the next sequence's first token.

:func:`check_micro_batch` validates the dict on the host (no collective, no device sync);
:func:`prepare_micro_batch` shifts the labels on the *full* row, then keeps this cp rank's
head+tail chunks of every sequence (:func:`strategies.context.cp_token_index` — the same
split the collator and the planner use) and builds the attention segments and the K/V
all-gather indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from strategies.context import cp_token_index
from strategies.kernels import AttentionSegments, build_segments

from .parallel import ParallelContext

__all__ = [
    "IGNORE_INDEX", "CheckedMicroBatch", "LocalBatch", "check_micro_batch", "prepare_micro_batch", "shift_labels",
]

IGNORE_INDEX = -100
"""Label value that carries no loss (Hugging Face / PyTorch convention)."""


def shift_labels(labels: np.ndarray) -> np.ndarray:
    """Next-token targets of a packed row: ``targets[i] = labels[i+1]``, the last is −100.

    With the first label of every sequence −100 the last token of each sequence gets −100,
    so no target crosses a sequence boundary.
    """
    labels = np.asarray(labels, dtype=np.int64)
    out = np.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    return out


def _row(mb: Mapping[str, Any], key: str, index: int) -> np.ndarray:
    if key not in mb:
        raise ValueError(f"micro-batch {index} has no {key!r}; expected the packed format of design.md §7")
    value = mb[key]
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"micro-batch {index}: {key!r} has shape {tuple(arr.shape)}, expected (1, T)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"micro-batch {index}: {key!r} has dtype {arr.dtype}, expected integers")
    return arr.astype(np.int64, copy=False)


@dataclass(frozen=True, slots=True)
class CheckedMicroBatch:
    """Host arrays of one validated micro-batch (tokens are int64)."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    seq_lens: np.ndarray
    """Tokens of every segment of the row (a trailing padding segment included)."""
    sample_ids: np.ndarray | None
    global_loss_tokens: int | None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.size)


def check_micro_batch(mb: Mapping[str, Any], index: int, vocab_size: int) -> CheckedMicroBatch:
    """Validate one packed micro-batch; raise ``ValueError`` naming the field and the fix."""
    if not isinstance(mb, Mapping):
        raise ValueError(f"micro-batch {index} is a {type(mb).__name__}, expected a dict of tensors (design.md §7)")
    ids = _row(mb, "input_ids", index)
    labels = _row(mb, "labels", index)
    pos = _row(mb, "position_ids", index)
    cu = _row(mb, "cu_seqlens", index)
    t = ids.size
    if labels.size != t or pos.size != t:
        raise ValueError(
            f"micro-batch {index}: input_ids has {t} tokens but labels has {labels.size} and "
            f"position_ids {pos.size}; all three must be (1, T)"
        )
    if cu.size == 0 or cu[0] != 0 or cu[-1] != t:
        raise ValueError(f"micro-batch {index}: cu_seqlens must run from 0 to T={t}, got {cu.tolist()[:8]}")
    seq_lens = np.diff(cu)  # every segment, a trailing padding segment included
    if seq_lens.size and seq_lens.min() < 1:
        bad = int(np.flatnonzero(seq_lens < 1)[0])
        raise ValueError(
            f"micro-batch {index}: sequence {bad} has {int(seq_lens[bad])} tokens (cu_seqlens must increase)"
        )
    num_sequences = seq_lens.size
    if "seq_lens" in mb:
        given = _row(mb, "seq_lens", index)
        padded = given.size == seq_lens.size - 1 and np.array_equal(given, seq_lens[:-1])
        if not (padded or np.array_equal(given, seq_lens)):
            raise ValueError(
                f"micro-batch {index}: seq_lens {given.tolist()[:8]} disagree with cu_seqlens {cu.tolist()[:8]}"
            )
        num_sequences = given.size
        if padded and np.any(labels[cu[-2]:] != IGNORE_INDEX):
            raise ValueError(
                f"micro-batch {index}: the padding segment after the last sequence carries labels; pad with -100"
            )
    if "max_seqlen" in mb and t and int(mb["max_seqlen"]) != int(seq_lens.max()):
        raise ValueError(
            f"micro-batch {index}: max_seqlen={int(mb['max_seqlen'])} but the longest segment has {int(seq_lens.max())}"
        )
    if t:
        want_pos = np.arange(t, dtype=np.int64) - np.repeat(cu[:-1], seq_lens)
        if not np.array_equal(pos, want_pos):
            bad = int(np.flatnonzero(pos != want_pos)[0])
            raise ValueError(
                f"micro-batch {index}: position_ids[{bad}]={int(pos[bad])}, expected {int(want_pos[bad])}; "
                "positions must restart at 0 for every sequence"
            )
        first = labels[cu[:-1]]
        if np.any(first != IGNORE_INDEX):
            bad = int(np.flatnonzero(first != IGNORE_INDEX)[0])
            raise ValueError(
                f"micro-batch {index}: sequence {bad} starts with label {int(first[bad])}; the first label of every "
                f"sequence must be {IGNORE_INDEX} (Hugging Face convention: the model shifts)"
            )
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"micro-batch {index}: input_ids outside 0..{vocab_size - 1} (vocab_size={vocab_size})")
        ok = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < vocab_size))
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise ValueError(
                f"micro-batch {index}: labels[{bad}]={int(labels[bad])} is neither {IGNORE_INDEX} nor a token id"
            )
    sample_ids = _row(mb, "sample_ids", index) if "sample_ids" in mb else None
    if sample_ids is not None and sample_ids.size != num_sequences:
        raise ValueError(f"micro-batch {index}: {sample_ids.size} sample_ids for {num_sequences} sequences")
    glt = int(mb["global_loss_tokens"]) if "global_loss_tokens" in mb else None
    return CheckedMicroBatch(
        input_ids=ids, labels=labels, position_ids=pos, seq_lens=seq_lens, sample_ids=sample_ids, global_loss_tokens=glt
    )


@dataclass(frozen=True, slots=True)
class LocalBatch:
    """One micro-batch as this rank runs it: shifted targets, this cp rank's rows, on device."""

    input_ids: torch.Tensor
    """(T_local,) int64 token ids of this rank's rows."""
    position_ids: torch.Tensor
    """(T_local,) int64 true positions inside each sequence (for RoPE)."""
    targets: torch.Tensor
    """(T_local,) int64 next-token targets, −100 where no loss."""
    segments: AttentionSegments
    """Attention layout (queries = local rows, keys = full row under cp); kernel tensors on the device."""
    num_tokens: int
    """Tokens of the whole packed row (before cp sharding)."""
    num_loss_tokens: int
    """Targets on this rank that carry loss (≠ −100)."""
    cp_counts: tuple[int, ...] = (0,)
    """Rows held by each cp rank (index = cp coordinate)."""
    cp_full_from_gathered: torch.Tensor | None = None
    """Index into the concatenated all-gather (members in ``cp_order``) giving packed-row order."""
    cp_own_rows: torch.Tensor | None = None
    """This rank's packed-row positions (the K/V rows its backward keeps)."""


def prepare_micro_batch(mb: CheckedMicroBatch, pc: ParallelContext, device: torch.device) -> LocalBatch:
    """Shift labels on the full row, keep this cp rank's head+tail chunks, move to ``device``."""
    targets = shift_labels(mb.labels)
    cp = pc.cp_size

    def dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)

    if cp == 1:
        return LocalBatch(
            input_ids=dev(mb.input_ids),
            position_ids=dev(mb.position_ids),
            targets=dev(targets),
            segments=build_segments(mb.seq_lens, device=device),
            num_tokens=mb.num_tokens,
            num_loss_tokens=int((targets != IGNORE_INDEX).sum()),
            cp_counts=(mb.num_tokens,),
        )
    rows = [cp_token_index(mb.seq_lens, cp, r) for r in range(cp)]
    own = rows[pc.cp_rank]
    gathered = np.concatenate([rows[r] for r in pc.cp_order])  # packed-row position of each gathered row
    full_from_gathered = np.empty_like(gathered)
    full_from_gathered[gathered] = np.arange(gathered.size)
    local_targets = targets[own]
    return LocalBatch(
        input_ids=dev(mb.input_ids[own]),
        position_ids=dev(mb.position_ids[own]),
        targets=dev(local_targets),
        segments=build_segments(mb.seq_lens, cp, pc.cp_rank, device),
        num_tokens=mb.num_tokens,
        num_loss_tokens=int((local_targets != IGNORE_INDEX).sum()),
        cp_counts=tuple(int(r.size) for r in rows),
        cp_full_from_gathered=dev(full_from_gathered),
        cp_own_rows=dev(own),
    )
