"""Pure packing and assignment algorithms on numpy arrays (numba kernels, CP-SAT models, bounds)."""

__all__: list[str] = []
