"""Reading a stream into step shares: skip what a state consumed, measure, cut over-long samples, apply the budget.

:class:`StreamReader` turns one epoch of a stream into :class:`Share` s — the samples of
one step, in arrival order, closed by the budget rule (``tokens`` or ``sequences`` per
share) — and keeps a running fingerprint of every token count read (:class:`LengthsHash`),
so a share knows the stream position and fingerprint a resume would skip to. The
replicated mode reads one share per step with the global budget; the per-rank mode
(:mod:`dataloader.stream_shards`) reads one share per rank and step with its local budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .config import SamplerStats
from .lengths import IGNORE_INDEX
from .state import LengthsHash

__all__ = ["PIECE_ID_BASE", "Row", "Share", "StreamReader", "token_key", "tokens_of"]

PIECE_ID_BASE = 1 << 48
"""Plan ids of split pieces after the first, in streaming mode (sample ids stay below it)."""
_END = object()
"""Sentinel: the stream has no next sample."""
_KEY_TOKENS = 8
"""Leading token ids per sample that enter the batch fingerprint (with the last one)."""


class Row(NamedTuple):
    """One sequence (a sample, or a piece of a split one) of a step, as the builder needs it."""

    sample_id: int
    """The sample's id in the specs (its stream position; per rank: ``position * world_size + rank``)."""
    sample: Any
    """The sample itself (``None`` until it arrived, for a per-rank sample held by another rank)."""
    start: int
    end: int
    """Token range ``[start, end)`` of the sample this sequence holds."""
    loss_tokens: int
    full_length: int
    """Tokens of the whole sample."""


@dataclass(slots=True)
class Share:
    """The samples of one step read from one stream: ``(position, sample, pieces, label prefix sums)`` each."""

    items: list[tuple[int, Any, list[tuple[int, int]], np.ndarray | None]]
    end: int
    """Stream position after the share: every sample before it is in this or an earlier share, or dropped."""
    fingerprint: str
    """:class:`LengthsHash` of the token counts of the stream up to ``end``."""
    closed: bool
    """True when the budget closed the share, False when the stream ended."""

    def rows(self) -> list[tuple[int, int, int, int, int]]:
        """``(position, start, end, loss_tokens, full_length)`` of each sequence (piece), in order."""
        out = []
        for pos, sample, pieces, carries in self.items:
            n = len(tokens_of(sample))
            for lo, hi in pieces:
                loss = int(carries[hi] - carries[min(lo + 1, hi)]) if carries is not None else hi - lo - 1
                out.append((pos, lo, hi, loss, n))
        return out


def tokens_of(sample: Any, input_key: str = "input_ids") -> Any:
    return sample[input_key] if isinstance(sample, Mapping) else sample


def token_key(tokens: Any) -> bytes:
    """A sample's first few token ids and its last one, as bytes (enough to tell two streams apart)."""
    n = len(tokens)
    head = [int(t) for t in tokens[: min(n, _KEY_TOKENS)]]
    head.append(int(tokens[n - 1]))
    return np.asarray(head, dtype=np.int64).tobytes()


class StreamReader:
    """One stream's samples as step shares (module docstring); counts what the over-long policy does in ``stats``."""

    def __init__(
        self, dataset: Any, *, input_key: str, labels_key: str, max_length: int, overlong: str, stats: SamplerStats, what: str = "the state"
    ) -> None:
        self.dataset = dataset
        self.input_key, self.labels_key = input_key, labels_key
        self.max_length, self.overlong = max_length, overlong
        self.stats = stats
        self.what = what
        """How resume errors name the saved fields (``the state``, ``the state's shards[1]``)."""
        self.read = 0
        """Samples read (skipped ones included) in the current epoch."""

    def source(self, epoch: int, skip: int, expect: str, hashed: LengthsHash) -> Iterator[Any]:
        """The epoch's stream after its first ``skip`` samples, whose token counts must hash to ``expect``."""
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        it = self._timed(iter(self.dataset))
        for pos in range(skip):
            sample = next(it, _END)
            if sample is _END:
                raise ValueError(
                    f"cannot resume: {self.what} says {skip} samples of epoch {epoch}'s stream were consumed, "
                    f"but the stream ends after {pos} (samples_consumed={skip}); it is not the stream the state was saved on "
                    "(resume on the same stream, or start the epoch again with set_epoch)"
                )
            hashed.update(self.measure(sample, pos)[0])
        if skip and hashed.hexdigest() != expect:
            raise ValueError(
                f"cannot resume: the first {skip} samples of epoch {epoch}'s stream differ from those the state was "
                f"saved on (their token counts hash to {hashed.hexdigest()!r}, {self.what} says consumed_fingerprint="
                f"{expect!r}): another stream, order, shard or tokenisation. Resume on the same stream in the same "
                "order, or start the epoch again with set_epoch"
            )
        self.read = skip
        return it

    def _timed(self, it: Iterator[Any]) -> Iterator[Any]:
        """``it``, with the thread CPU time of each ``next`` counted in ``stats.read_seconds``."""
        stats = self.stats
        while True:
            cpu = time.thread_time()
            sample = next(it, _END)
            stats.read_seconds += time.thread_time() - cpu
            if sample is _END:
                return
            yield sample

    def measure(self, sample: Any, pos: int) -> tuple[int, np.ndarray | None]:
        """(tokens, label-carrying prefix sums or None) of one stream sample."""
        if isinstance(sample, Mapping) and self.input_key not in sample:
            raise ValueError(f"stream sample {pos} has no field {self.input_key!r}; fields: {sorted(sample)}")
        n = len(tokens_of(sample, self.input_key))
        if n < 1:
            raise ValueError(f"stream sample {pos} has 0 tokens; every sample needs at least 1 token (filter empty rows)")
        if isinstance(sample, Mapping) and self.labels_key in sample:
            labels = np.asarray(sample[self.labels_key])
            if labels.shape != (n,):
                raise ValueError(f"stream sample {pos}: {self.labels_key!r} has {labels.size} entries, {self.input_key!r} has {n}")
            return n, np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
        return n, None

    def pieces(self, n: int, pos: int) -> list[tuple[int, int]]:
        """Token ranges a sample of ``n`` tokens is trained as (empty: dropped)."""
        cap, policy = self.max_length, self.overlong
        if n <= cap:
            return [(0, n)]
        if policy == "error":
            raise ValueError(
                f"stream sample {pos} has {n} tokens, above the largest capacity {cap}; "
                "use overlong='truncate', 'split' or 'drop', or add a candidate with more capacity"
            )
        if policy == "drop":
            return []
        if policy == "truncate":
            self.stats.truncated += 1
            self.stats.truncated_tokens += n - cap
            return [(0, cap)]
        out = [(0, cap)]
        while out[-1][1] < n:
            start = out[-1][1] - 1  # overlap one token: every target is trained exactly once
            out.append((start, min(n, start + cap)))
        self.stats.split += 1
        self.stats.extra_pieces += len(out) - 1
        return out

    def shares(self, epoch: int, skip: int, expect: str, *, tokens: int | None, sequences: int | None) -> Iterator[Share]:
        """The epoch's shares after ``skip`` samples: each takes samples until the next would exceed ``tokens``
        (a first sample always fits) or holds ``sequences`` samples; the last one may be partial (``closed=False``)."""
        hashed = LengthsHash()
        pending: list[tuple[int, Any, list[tuple[int, int]], np.ndarray | None]] = []
        acc = 0
        pos = skip - 1
        for pos, sample in enumerate(self.source(epoch, skip, expect, hashed), start=skip):
            if pos >= PIECE_ID_BASE:
                raise ValueError(f"stream epoch longer than {PIECE_ID_BASE} samples; start a new epoch earlier")
            self.read = self.stats.num_samples = pos + 1
            n, carries = self.measure(sample, pos)
            pieces = self.pieces(n, pos)
            if not pieces:
                hashed.update(n)
                self.stats.dropped_overlong += 1
                if len(self.stats.dropped_overlong_ids) < 16:
                    self.stats.dropped_overlong_ids.append(pos)
                continue
            size = sum(hi - lo for lo, hi in pieces)
            full = len(pending) == sequences if sequences is not None else acc > 0 and acc + size > int(tokens or 0)
            if full:  # every sample before ``pos`` is now in a share or dropped (and hashed)
                yield Share(pending, pos, hashed.hexdigest(), True)
                pending, acc = [], 0
            hashed.update(n)
            pending.append((pos, sample, pieces, carries))
            acc += size
        if pending:
            yield Share(pending, pos + 1, hashed.hexdigest(), sequences is not None and len(pending) == sequences)
