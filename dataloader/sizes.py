"""Sanity of the sizes a run was configured with: a clear word before an hour of surprise.

Two mistakes make a run silently pointless or endless: a global batch so large that an
epoch has one or two steps (``tokens_per_step=1 << 20`` on a 700K-token dataset: one
optimizer step per epoch), and micro-batches far beyond what the cost model measured
(a CPU calibration timed up to 2,048 tokens, a capacity of two million: the planned
micro-batch takes hours, not the extrapolated estimate). The sampler calls these checks
and warns; nothing is changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .spec import MicroBatchSpec

__all__ = ["MicroBatchSizeCheck", "step_size_warning"]


def step_size_warning(
    *, tokens_per_step: int | None, sequences_per_step: int | None, epoch_tokens: int, epoch_sequences: int
) -> str | None:
    """A warning when one global batch holds more than half of an epoch, else ``None``."""
    if tokens_per_step is not None and 2 * tokens_per_step > epoch_tokens:
        share = tokens_per_step / max(epoch_tokens, 1)
        return (
            f"tokens_per_step={tokens_per_step:,} is {share:.0%} of the {epoch_tokens:,} tokens of an epoch: one "
            "optimizer step takes more than half the data (the first step may hold all of it); lower tokens_per_step "
            f"to at most {max(epoch_tokens // 8, 1):,} for 8 steps per epoch"
        )
    if sequences_per_step is not None and 2 * sequences_per_step > epoch_sequences:
        return (
            f"sequences_per_step={sequences_per_step:,} is more than half of the {epoch_sequences:,} sequences of an "
            "epoch: one optimizer step takes more than half the data; lower sequences_per_step"
        )
    return None


class MicroBatchSizeCheck:
    """Warns (once) when a micro-batch holds more tokens than its layout's cost was measured for.

    ``cost_model``: the balancer's :class:`~balancer.cost.CostModel` (anything with
    ``measured_tokens(layout)``); models that measured nothing (analytic, given
    coefficients) never warn.
    """

    def __init__(self, cost_model: Any) -> None:
        self._measured = getattr(cost_model, "measured_tokens", None)
        self.warned = False

    def check(self, step: int, rank: int, layout: Any, micro_batches: Sequence[MicroBatchSpec]) -> str | None:
        """The warning for this rank's micro-batches of ``step`` (first time only), else ``None``."""
        if self.warned or self._measured is None or not micro_batches:
            return None
        measured = self._measured(layout)
        if not measured:
            return None
        k, biggest = max(enumerate(mb.num_tokens for mb in micro_batches), key=lambda kv: kv[1])
        if biggest <= measured:
            return None
        self.warned = True
        return (
            f"micro-batch {k} of step {step} on rank {rank} holds {biggest:,} tokens, {biggest / measured:.1f}× the "
            f"largest micro-batch the cost model measured for {layout.name} ({measured:,} tokens): its time is an "
            "extrapolation and may be far longer than planned. Calibrate at lengths up to the micro-batch size "
            "(hydraulis calibrate --lengths …), or cap micro-batches with a smaller token_capacity"
        )
