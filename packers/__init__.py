"""Pure packing and assignment algorithms on numpy arrays (numba kernels, CP-SAT models, bounds).

Units: sizes and capacities in tokens (int64), times in seconds (float64) — any one time
unit works if used consistently. Every entry point validates its input and raises
``ValueError`` naming the offending index, value and limit; empty inputs are errors.
See ``docs/packers.md`` for the algorithms, their guarantees and the bound formulas.
"""

from packers.binpack import best_fit_decreasing, first_fit_decreasing, first_fit_decreasing_groups, next_fit
from packers.bounds import bin_packing_lower_bound, makespan_lower_bound, minmax_pack_lower_bound
from packers.cpsat import cpsat_makespan, cpsat_minmax_pack
from packers.makespan import lpt_makespan, makespan_loads
from packers.minmax import minmax_pack
from packers.partition import karmarkar_karp
from packers.types import Assignment, BinPacking

__all__ = [
    "Assignment",
    "BinPacking",
    "best_fit_decreasing",
    "bin_packing_lower_bound",
    "cpsat_makespan",
    "cpsat_minmax_pack",
    "first_fit_decreasing",
    "first_fit_decreasing_groups",
    "karmarkar_karp",
    "lpt_makespan",
    "makespan_loads",
    "makespan_lower_bound",
    "minmax_pack",
    "minmax_pack_lower_bound",
    "next_fit",
]
