"""Token packing into one bin per rank per step: the multipack sampler, best-fit-decreasing (TRL, OLMo-core)."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np

from packers.binpack import best_fit_decreasing, first_fit_decreasing
from packers.types import group_by_bin
from strategies.layout import Strategy

from .base import Assignment, BaselinePolicy, _deal, _split_largest

__all__ = ["BestFitPolicy", "MultipackPolicy"]


def _step_capacity(pack: Callable[[np.ndarray, int], Any], lengths: np.ndarray, num_bins: int, capacity: int) -> int:
    """Bin size for "one bin per rank": the smallest size (found by bisection) from
    ``max(longest, ⌈tokens / R⌉)`` up to the layout capacity for which ``pack`` needs at
    most ``R`` bins; the layout capacity when even that needs more."""
    lo = max(int(lengths.max()), -(-int(lengths.sum()) // num_bins))
    if lo >= capacity or pack(lengths, capacity).num_bins > num_bins:
        return capacity
    hi = capacity  # invariant: hi fits in num_bins bins
    while lo < hi:
        mid = (lo + hi) // 2
        if pack(lengths, mid).num_bins <= num_bins:
            hi = mid
        else:
            lo = mid + 1
    return hi


class MultipackPolicy(BaselinePolicy):
    """Multipack sampler: token first-fit-decreasing, one bin per rank per step.

    The bin size is the per-rank token budget of the step (see :func:`_step_capacity`):
    FFD then fills exactly one bin per replica when the layout capacity allows. A batch
    that needs more than ``R`` bins of the full capacity runs them as successive
    micro-steps, bin ``b`` on replica ``b mod R``.
    """

    name = "multipack"
    packer: ClassVar[Callable[[np.ndarray, int], Any]] = staticmethod(first_fit_decreasing)

    def _bins(self, lengths: np.ndarray) -> list[np.ndarray]:
        pack = type(self).packer
        cap = _step_capacity(pack, lengths, len(self.strategy.replicas), self.capacity)
        packing = pack(lengths, cap)
        return group_by_bin(np.asarray(packing.bin_of), int(packing.num_bins))

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        return self.strategy, self._finish(_deal(self._bins(lengths), len(self.strategy.replicas)), lengths)

    def _finish(self, per_replica: Assignment, lengths: np.ndarray) -> Assignment:
        pps = [rep.layout.pp for rep in self.strategy.replicas]
        return [_split_largest(mbs, lengths, pp) for mbs, pp in zip(per_replica, pps)]


class BestFitPolicy(MultipackPolicy):
    """Best-fit-decreasing packing by tokens (TRL ``packing_strategy="bfd"``, OLMo-core).

    Bins are sized as for ``multipack``. Packed rows are drawn in random order by the data
    loader: the bins are shuffled with the step's seed, then dealt one per replica per
    micro-step.
    """

    name = "bfd"
    packer = staticmethod(best_fit_decreasing)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        bins = self._bins(lengths)
        bins = [bins[k] for k in rng.permutation(len(bins))]
        return self.strategy, self._finish(_deal(bins, len(self.strategy.replicas)), lengths)
