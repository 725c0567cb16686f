"""Pure packing and assignment algorithms on numpy arrays (numba kernels, CP-SAT models, bounds)."""

from . import binpack, types
from .binpack import best_fit_decreasing, first_fit_decreasing, next_fit
from .bounds import bin_packing_lower_bound, makespan_lower_bound, minmax_pack_lower_bound
from .cpsat import cpsat_makespan, cpsat_minmax_pack
from .makespan import lpt_makespan, makespan_loads
from .minmax import minmax_pack
from .partition import karmarkar_karp
from .types import Assignment, BinPacking

__all__ = [
    "Assignment",
    "BinPacking",
    "best_fit_decreasing",
    "bin_packing_lower_bound",
    "binpack",
    "cpsat_makespan",
    "cpsat_minmax_pack",
    "first_fit_decreasing",
    "karmarkar_karp",
    "lpt_makespan",
    "makespan_loads",
    "makespan_lower_bound",
    "minmax_pack",
    "minmax_pack_lower_bound",
    "next_fit",
    "types",
]
