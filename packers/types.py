"""Result types shared by every packer.

Two shapes of answer:

* :class:`BinPacking` — items into as many bins of one token capacity as needed
  (first-fit / best-fit decreasing, next-fit).
* :class:`Assignment` — items onto a *fixed* set of ``m`` bins, scored by the largest
  bin load (makespan, min-max packing, k-way partition, CP-SAT).

Both hold ``bin_of`` (int64[n], bin index of every item); ``bins()`` turns it into the
per-bin item lists, items in increasing index order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BinPacking", "Assignment", "group_by_bin"]


def group_by_bin(bin_of: np.ndarray, num_bins: int) -> list[np.ndarray]:
    """Item indices of every bin, ``num_bins`` int64 arrays (empty bins give empty arrays)."""
    order = np.argsort(bin_of, kind="stable")
    bounds = np.searchsorted(bin_of[order], np.arange(num_bins + 1))
    return [order[bounds[j] : bounds[j + 1]] for j in range(num_bins)]


@dataclass(frozen=True, slots=True, kw_only=True)
class BinPacking:
    """Items packed into bins of one token capacity."""

    bin_of: np.ndarray
    """int64[n]: bin of every item, in ``0 .. num_bins-1``; bins are numbered in opening order."""
    num_bins: int
    """Bins used (every one of them non-empty)."""
    loads: np.ndarray
    """int64[num_bins]: tokens in every bin (each ``<= capacity``)."""
    capacity: int
    """Token capacity of every bin."""
    solver: str
    """Algorithm that produced the packing: ``"ffd"``, ``"bfd"`` or ``"next_fit"``."""

    def bins(self) -> list[np.ndarray]:
        """Item indices of every bin (int64 arrays, increasing item order)."""
        return group_by_bin(self.bin_of, self.num_bins)


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """Items assigned to a fixed set of ``m`` bins, scored by the largest bin load.

    Loads are in the unit of the input times (seconds by convention). ``bound``, when
    given, is a proven lower bound on the optimal makespan of the same instance, so
    ``makespan / bound`` bounds the optimality gap from above.
    """

    bin_of: np.ndarray
    """int64[n]: bin of every item, in ``0 .. m-1``."""
    loads: np.ndarray
    """float64[m]: load of every bin, recomputed exactly from ``bin_of`` (0 for an empty bin)."""
    makespan: float
    """``max(loads)``: the objective every packer here minimises."""
    solver: str
    """Who produced ``bin_of``: e.g. ``"lpt+ls"``, ``"cpsat:OPTIMAL"``, ``"lpt+ls;cpsat:UNKNOWN"``
    (CP-SAT ran but the greedy answer was kept), ``"karmarkar_karp"``."""
    bound: float | None = None
    """A proven lower bound on the optimum (same unit as ``loads``), or ``None`` when unknown."""
    status: str = "heuristic"
    """``"heuristic"`` for greedy answers; for CP-SAT the solver's status name
    (``OPTIMAL``, ``FEASIBLE``, ``INFEASIBLE``, ``MODEL_INVALID``, ``UNKNOWN``)."""

    @property
    def num_bins(self) -> int:
        """Number of bins ``m`` (empty ones included)."""
        return int(self.loads.shape[0])

    def bins(self) -> list[np.ndarray]:
        """Item indices of every bin (int64 arrays, increasing item order)."""
        return group_by_bin(self.bin_of, self.num_bins)
