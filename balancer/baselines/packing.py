"""Token packing with one packed row per rank per micro-step: the OpenChat multipack
sampler (first-fit decreasing) and best-fit decreasing (TRL ``pack_dataset``, OLMo-core)."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np

from packers.binpack import best_fit_decreasing, first_fit_decreasing
from strategies.layout import Strategy

from .base import Assignment, BaselinePolicy, _deal, _split_largest
from .rules import rows_per_rank

__all__ = ["BestFitPolicy", "MultipackPolicy"]


class MultipackPolicy(BaselinePolicy):
    """OpenChat's multipack sampler: first-fit decreasing, one bin per rank per micro-step.

    The batch is packed FFD into rows of the layout capacity. When that takes a multiple
    of ``R`` rows — always for a batch the multipack sampler chose itself, which is the
    longest run of its stream that packs into exactly ``R`` bins — the rows are kept and
    row ``b`` runs on replica ``b mod R`` (the sampler's own assignment). Otherwise every
    replica gets ``k`` rows (``k`` = rows ÷ ``R``, rounded up): the row length is lowered
    to the smallest that packs into ``k·R`` rows (:func:`~balancer.baselines.rules.rows_per_rank`),
    and the fullest rows are split if fewer came out. No replica ever runs an extra
    micro-step alone.
    """

    name = "multipack"
    system = "OpenChat multipack sampler V1 (a023ee17; V2-linear gives the same)"
    fidelity = ("exact on the sampler's own steps: rank r gets bin r (24/24, up to equal-length ties the peer "
                "leaves undefined); other batches get k rows per rank at a lowered row length (ours)")
    packer: ClassVar[Callable[[np.ndarray, int], Any]] = staticmethod(first_fit_decreasing)

    def _rows(self, lengths: np.ndarray) -> list[np.ndarray]:
        num = len(self.strategy.replicas)
        rows = rows_per_rank(type(self).packer, lengths, self.capacity, num)
        return _split_largest(rows, lengths, -(-len(rows) // num) * num)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        return self.strategy, self._finish(_deal(self._rows(lengths), len(self.strategy.replicas)), lengths)

    def _finish(self, per_replica: Assignment, lengths: np.ndarray) -> Assignment:
        pps = [rep.layout.pp for rep in self.strategy.replicas]
        return [_split_largest(mbs, lengths, pp) for mbs, pp in zip(per_replica, pps)]


class BestFitPolicy(MultipackPolicy):
    """Best-fit decreasing (TRL ``pack_dataset(strategy="bfd")``, OLMo-core ``InstancePacker``).

    Rows as for ``multipack`` with the BFD packer (ties to the row that reached the
    residual first, as both peers break them): a batch TRL packs into a multiple of
    ``R`` rows keeps exactly TRL's rows. The trainer draws packed rows in random order,
    so the rows are shuffled with the step's seed before row ``b`` goes to replica
    ``b mod R``.
    """

    name = "bfd"
    system = "TRL 1.16 `pack_dataset` (bfd); OLMo-core 3.0 `InstancePacker`"
    fidelity = ("packing exact (TRL 36/36 assignments, OLMo-core 36/36); TRL's rows kept when they divide by R "
                "(8/8), else k rows per rank at a lowered row length (ours)")
    packer = staticmethod(best_fit_decreasing)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        rows = self._rows(lengths)
        rows = [rows[k] for k in rng.permutation(len(rows))]
        return self.strategy, self._finish(_deal(rows, len(self.strategy.replicas)), lengths)
