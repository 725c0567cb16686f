"""Padded fixed-count batching: random micro-batches and Hugging Face's length grouping."""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.layout import Strategy

from .base import Assignment, BaselinePolicy, _deal, _micro_batch_size, _split_largest
from .rules import length_grouped_order

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
    system = "Hugging Face `Trainer` default: distributed sampler, `DataCollatorWithPadding`"
    fidelity = "from the documented behaviour; no peer fixture"

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
    """Hugging Face ``group_by_length`` (transformers ``LengthGroupedSampler`` + accelerate).

    The sampler, not the split, does the grouping: over the whole epoch it cuts a random
    permutation into mega-batches of ``50 × batch_size`` sequences (``batch_size`` =
    micro-batch size × gradient-accumulation steps), sorts each by decreasing length and
    puts the longest sequence first (:meth:`epoch_order`, exactly transformers' order
    for the same permutation). A step is then consecutive sequences of that order, cut in
    order into micro-batches of ``micro_batch_size``; micro-batch ``b`` runs on replica
    ``b mod R`` (accelerate's ``BatchSamplerShard``). Micro-batches are padded as in
    ``padded``. ``gradient_accumulation_steps`` defaults to the micro-steps a
    ``tokens_per_step`` budget takes at the dataset's mean length (at least 1).

    Framing: transformers' steps hold a fixed number of sequences; the simulator's
    steps hold about ``tokens_per_step`` tokens of the same order.
    """

    name = "length_grouped"
    pads = True
    system = "transformers 5.25 `LengthGroupedSampler` + accelerate `BatchSamplerShard`"
    fidelity = ("exact: the epoch order for the same permutation (4/4 fixtures) and every rank's micro-batches "
                "(12/12); steps of about tokens_per_step tokens instead of a fixed count")

    def __init__(
        self, *args: Any, micro_batch_size: int | None = None, gradient_accumulation_steps: int | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.micro_batch_size = _micro_batch_size(self, micro_batch_size)
        if gradient_accumulation_steps is not None and int(gradient_accumulation_steps) < 1:
            raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be >= 1")
        self.gradient_accumulation_steps = gradient_accumulation_steps

    def epoch_order(self, lengths: np.ndarray, permutation: np.ndarray, tokens_per_step: int) -> np.ndarray:
        """The sampler's order of one epoch (``lengths`` of the whole dataset, tokens)."""
        accum = self.gradient_accumulation_steps
        if accum is None:
            per_step = len(self.strategy.replicas) * self.micro_batch_size * max(1.0, float(np.mean(lengths)))
            accum = max(1, round(tokens_per_step / per_step))
        return length_grouped_order(lengths, self.micro_batch_size * int(accum), permutation)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        mbs = self.micro_batch_size
        batches = [np.arange(k, min(k + mbs, lengths.size), dtype=np.int64) for k in range(0, lengths.size, mbs)]
        out = _deal(batches, len(self.strategy.replicas))
        pps = [rep.layout.pp for rep in self.strategy.replicas]
        return self.strategy, [_split_largest(m, lengths, pp) for m, pp in zip(out, pps)]
