"""What one micro-batch is made of: the request the sampler hands to the collator.

A :class:`MicroBatchSpec` is small and picklable (it travels to DataLoader workers). It
names the sequences of one micro-batch on this rank, in packing order, each as a
*piece* of a dataset sample: ``sample_ids[i]`` tokens ``[starts[i], ends[i])``. A piece is
the whole sample unless the over-long policy truncated or split it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MicroBatchSpec"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MicroBatchSpec:
    """One micro-batch of one rank in one optimizer step."""

    step: int
    """Global step (counts optimizer steps from the start of the run, across epochs)."""
    epoch: int
    step_in_epoch: int
    index: int
    """Position ``k`` of this micro-batch among the rank's micro-batches of the step."""
    num_micro_batches: int
    """Micro-batches this rank runs in the step (an idle replica has one, empty)."""
    sample_ids: tuple[int, ...]
    """Dataset index of every sequence, in packing order."""
    starts: tuple[int, ...]
    """First token of each piece inside its sample (0 unless split)."""
    ends: tuple[int, ...]
    """One past the last token of each piece (the sample length unless truncated/split)."""
    full_lengths: tuple[int, ...]
    """Tokens of each whole sample according to the length source (checked on fetch)."""
    loss_tokens: tuple[int, ...]
    """Planned loss-carrying tokens per piece (checked by the packed collator)."""
    global_loss_tokens: int
    """Loss tokens of the whole global batch (all ranks, all micro-batches)."""
    cp: int = 1
    """Context-parallel degree of this rank's replica."""
    cp_rank: int = 0
    """This rank's context-parallel coordinate."""

    def __post_init__(self) -> None:
        n = len(self.sample_ids)
        for name in ("starts", "ends", "full_lengths", "loss_tokens"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"MicroBatchSpec: {name} has {len(getattr(self, name))} entries, sample_ids has {n}")
        if not 0 <= self.index < self.num_micro_batches:
            raise ValueError(f"MicroBatchSpec: index {self.index} outside 0..{self.num_micro_batches - 1}")

    @property
    def seq_lens(self) -> tuple[int, ...]:
        """Tokens of every piece, packing order."""
        return tuple(e - s for s, e in zip(self.starts, self.ends))

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_tokens)

    @property
    def is_last(self) -> bool:
        """True for the rank's last micro-batch of the step (the one that syncs gradients)."""
        return self.index == self.num_micro_batches - 1

    @property
    def is_whole(self) -> tuple[bool, ...]:
        """Per sequence: does the piece cover the whole sample?"""
        return tuple(s == 0 and e == f for s, e, f in zip(self.starts, self.ends, self.full_lengths))
