"""Padded fixed-count batching: random micro-batches and Hugging Face's length grouping."""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.layout import Strategy

from .base import Assignment, BaselinePolicy, _deal, _micro_batch_size, _split_largest

__all__ = ["LengthGroupedPolicy", "PaddedPolicy"]


class PaddedPolicy(BaselinePolicy):
    """Fixed-count random micro-batches, padded to their longest sequence.

    The batch is shuffled and split into equal-count contiguous shares (as a distributed
    sampler does); each share is cut into micro-batches of ``micro_batch_size``
    sequences (default: as many ``max_length`` rows as the capacity holds, so the padded
    rectangle always fits).
    """

    name = "padded"
    pads = True

    def __init__(self, *args: Any, micro_batch_size: int | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.micro_batch_size = _micro_batch_size(self, micro_batch_size)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        perm = rng.permutation(lengths.size)
        out: Assignment = []
        for rep, share in zip(self.strategy.replicas, np.array_split(perm, len(self.strategy.replicas))):
            mbs = [share[k : k + self.micro_batch_size] for k in range(0, share.size, self.micro_batch_size)]
            out.append(_split_largest(mbs, lengths, rep.layout.pp))
        return self.strategy, out


class LengthGroupedPolicy(BaselinePolicy):
    """Hugging Face ``group_by_length``: shuffled mega-batches sorted by length, then split.

    The shuffled batch is cut into mega-batches of ``mult × micro_batch_size`` sequences
    (``mult = min(n // (4·micro_batch_size), 50)``, at least 1, as the
    ``LengthGroupedSampler`` does); each is sorted longest first and cut into
    micro-batches of ``micro_batch_size``, and micro-batch ``b`` goes to replica
    ``b mod R`` (how ``accelerate`` shards batches over processes). Micro-batches are
    padded as in ``padded``.
    """

    name = "length_grouped"
    pads = True

    def __init__(self, *args: Any, micro_batch_size: int | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.micro_batch_size = _micro_batch_size(self, micro_batch_size)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        perm = rng.permutation(lengths.size)
        mbs = self.micro_batch_size
        mega = max(1, min(lengths.size // (4 * mbs), 50)) * mbs
        batches: list[np.ndarray] = []
        for start in range(0, perm.size, mega):
            block = perm[start : start + mega]
            block = block[np.argsort(-lengths[block], kind="stable")]
            batches.extend(block[k : k + mbs] for k in range(0, block.size, mbs))
        out = _deal(batches, len(self.strategy.replicas))
        pps = [rep.layout.pp for rep in self.strategy.replicas]
        return self.strategy, [_split_largest(m, lengths, pp) for m, pp in zip(out, pps)]
