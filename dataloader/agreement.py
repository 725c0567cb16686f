"""What ranks compare at every step: the global batch's fingerprint, each rank's outcome, the plan's fit.

* :func:`batch_fingerprint` hashes a :class:`PlanBatch`'s ids, token counts, loss tokens
  and extra ``content`` (a stream's first token ids per sample): ranks that hold the same
  global batch have the same fingerprint, ranks whose data differs (another seed, order,
  dataset, a per-rank shard) do not.
* An outcome — built, end of data, stopped, failed — travels as one ``int64[8]`` per rank
  (:func:`encode_outcome`): kind, step, the fingerprint and the plan digest's first bytes.
* :func:`rank_plan_for` checks that a plan belongs to this rank's batch before the rank
  builds from it (the same sequences, loss tokens and world size).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from strategies.plan import RankPlan, StepPlan

from .distributed import check_world

__all__ = [
    "DATA_HINT",
    "END",
    "ERROR",
    "KINDS",
    "OK",
    "STOP",
    "PlanBatch",
    "batch_fingerprint",
    "decode_outcome",
    "describe_groups",
    "encode_outcome",
    "group_ranks",
    "rank_plan_for",
]


OK, END, STOP, ERROR = "ok", "end", "stop", "error"
KINDS = (OK, END, STOP, ERROR)
"""What a rank reports for a step: built it, reached the end of its data, stopped iterating, failed."""
_FINGERPRINT_WORDS, _DIGEST_WORDS = 2, 4
"""int64 words of a batch fingerprint (16 bytes) and of a plan digest's first 32 bytes in an outcome."""


def encode_outcome(kind: str, step: int, fingerprint: str, digest: str) -> np.ndarray:
    """An outcome as int64[8]: kind, step, the fingerprint's and the digest's bytes (zeros when absent)."""
    out = np.zeros(2 + _FINGERPRINT_WORDS + _DIGEST_WORDS, dtype=np.int64)
    out[0], out[1] = KINDS.index(kind), step
    for lo, hex_, words in ((2, fingerprint, _FINGERPRINT_WORDS), (2 + _FINGERPRINT_WORDS, digest, _DIGEST_WORDS)):
        if hex_:
            out[lo : lo + words] = np.frombuffer(bytes.fromhex(hex_)[: 8 * words], dtype=np.int64)
    return out


def decode_outcome(arr: np.ndarray) -> tuple[str, int, str, str]:
    fp = arr[2 : 2 + _FINGERPRINT_WORDS]
    dg = arr[2 + _FINGERPRINT_WORDS :]
    return KINDS[int(arr[0])], int(arr[1]), fp.tobytes().hex() if fp.any() else "", dg.tobytes().hex() if dg.any() else ""


@dataclass(frozen=True, slots=True)
class PlanBatch:
    """One global batch to plan (every rank builds the same sequence of these)."""

    step: int
    """Global step number (passed to ``Balancer.plan``)."""
    lengths: np.ndarray
    """int64[n] tokens per sequence (piece)."""
    ids: np.ndarray
    """int64[n] sequence ids (sample ids, or piece ids for split samples)."""
    loss_tokens: np.ndarray
    """int64[n] loss-carrying tokens per sequence."""
    meta: Any = None
    """Whatever the builder needs to turn the plan into this rank's work."""
    content: bytes = b""
    """Extra bytes that identify the batch's data (a stream's first tokens per sample); fingerprinted."""


def batch_fingerprint(batch: PlanBatch) -> str:
    """Hex digest of a batch's ids, lengths, loss tokens and ``content``: equal on ranks that hold the same batch."""
    h = hashlib.blake2b(digest_size=8 * _FINGERPRINT_WORDS)
    for arr in (batch.ids, batch.lengths, batch.loss_tokens):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    h.update(batch.content)
    return h.hexdigest()


def rank_plan_for(batch: PlanBatch, plan: StepPlan, rank: int, world_size: int) -> RankPlan:
    """``plan.for_rank(rank)`` after checking that the plan is ``batch``'s: the same sequences, loss tokens and world."""
    want_loss = int(batch.loss_tokens.sum())
    if plan.step != batch.step or plan.global_sequences != batch.ids.size or plan.global_loss_tokens != want_loss:
        raise ValueError(
            f"step {batch.step}: the plan (step {plan.step}) holds {plan.global_sequences} sequences / "
            f"{plan.global_loss_tokens} loss tokens but this rank's batch has {batch.ids.size} / {want_loss}; the plan "
            "does not belong to this rank's batch (do the ranks read the same data?)"
        )
    check_world(plan, world_size)
    planned = np.sort(np.fromiter(plan.sample_ids(), dtype=np.int64, count=plan.global_sequences))
    if not np.array_equal(planned, np.sort(batch.ids)):
        extra = np.setdiff1d(planned, batch.ids)
        missing = np.setdiff1d(batch.ids, planned)
        raise ValueError(
            f"step {batch.step}: the plan's sequences differ from this rank's batch (planned but not in the batch: "
            f"{extra[:4].tolist()}; in the batch but not planned: {missing[:4].tolist()}); the plan does not belong "
            "to this rank's batch"
        )
    return plan.for_rank(rank)


DATA_HINT = (
    "the data or its order differs across ranks. Every rank must build the loader with the same dataset (the whole "
    "dataset, not a per-rank shard: the plan assigns samples to ranks), the same lengths and the same seed and "
    "options (not seed + rank)"
)
"""Default advice when ranks hold different global batches (the streaming loader passes its own)."""


def group_ranks(values: list[str]) -> dict[str, list[int]]:
    """Ranks by value (``values[r]`` is rank ``r``'s)."""
    out: dict[str, list[int]] = {}
    for r, v in enumerate(values):
        out.setdefault(v, []).append(r)
    return out


def describe_groups(groups: dict[str, list[int]]) -> str:
    return "; ".join(f"ranks {rs}: {v[:12]}…" for v, rs in groups.items())
