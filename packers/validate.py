"""Input checks shared by every public packer.

Every check converts its input to the dtype the kernels expect and raises ``ValueError``
naming the offending index, its value and the limit it breaks. Nothing is dropped or
clipped silently. Empty inputs are errors: every public entry point needs at least one
item (callers with an empty batch have nothing to pack and should not call a packer).
"""

from __future__ import annotations

import math
import operator

import numpy as np

__all__ = [
    "as_sizes",
    "as_capacity",
    "as_num_bins",
    "as_times",
    "as_values",
    "as_bin_type",
    "as_speed",
    "as_pp_weight",
    "as_bin_capacity",
    "as_item_times",
    "check_eligible",
    "as_hint",
]

UNLIMITED_TOKENS = np.iinfo(np.int64).max // 4
"""Token capacity standing for "no limit" (large, yet safe to add item sizes to)."""


def _as_int(value: object, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}={value!r} must be an integer, not a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        pass
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise ValueError(f"{name}={value!r} must be a whole number")


def as_capacity(capacity: object, name: str = "capacity") -> int:
    """Token capacity of a bin as ``int`` (>= 1)."""
    cap = _as_int(capacity, name)
    if cap < 1:
        raise ValueError(f"{name}={cap} tokens; a bin must hold at least 1 token")
    return cap


def as_num_bins(num_bins: object, name: str = "num_bins") -> int:
    """Number of bins as ``int`` (>= 1)."""
    k = _as_int(num_bins, name)
    if k < 1:
        raise ValueError(f"{name}={k}; need at least 1 bin")
    return k


def _vector(values: object, name: str, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of {what}, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; give at least one item")
    return arr


def _integers(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    """``arr`` as int64, accepting floats only when they hold whole finite numbers."""
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{name} must hold integer {what}, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name}[{i}] = {float(arr[i])} is not a whole number of {what}")
    return arr.astype(np.int64, copy=False)


def as_sizes(sizes: object, name: str = "sizes") -> np.ndarray:
    """Item sizes in tokens as int64[n]; every size must be >= 1."""
    arr = _integers(_vector(sizes, name, "token counts"), name, "tokens")
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}[{i}] = {int(arr[i])} tokens; every item needs >= 1 token (drop empty sequences before packing)"
        )
    return arr


def as_values(values: object, name: str = "values") -> np.ndarray:
    """Non-negative finite item weights as float64[n]."""
    arr = _vector(values, name, "numbers")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] = {float(arr[i])}; every value must be finite and >= 0")
    return arr


def as_item_times(times: object, name: str = "times") -> np.ndarray:
    """Per-item times (seconds) as float64[n]: finite and >= 0."""
    return as_values(times, name)


def as_times(times: object, name: str = "times") -> np.ndarray:
    """Time table float64[n, K] (seconds of item i on a bin of type k).

    A 1-D array is read as one bin type (``K = 1``). Entries must be >= 0; ``+inf``
    marks "not eligible"; NaN and ``-inf`` are errors.
    """
    arr = np.asarray(times)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [items, bin types], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} has no rows; give at least one item")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no columns; give at least one bin type")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    bad = np.argwhere(np.isnan(arr) | (arr < 0))
    if bad.size:
        i, k = (int(v) for v in bad[0])
        raise ValueError(f"{name}[{i}, {k}] = {float(arr[i, k])}; times must be >= 0 (use +inf for 'not eligible')")
    return arr


def as_bin_type(bin_type: object, num_types: int, name: str = "bin_type") -> np.ndarray:
    """Type of every bin as int64[m], each in ``0 .. num_types-1``."""
    arr = _integers(_vector(bin_type, name, "type indices"), name, "type indices")
    bad = np.flatnonzero((arr < 0) | (arr >= num_types))
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"{name}[{j}] = {int(arr[j])} is not a column of times (it has {num_types} bin types: 0..{num_types - 1})"
        )
    return arr


def _per_bin(values: object, m: int, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != m:
        raise ValueError(f"{name} must have one entry per bin ({m}), got shape {arr.shape}")
    return arr


def as_speed(speed: object | None, m: int, name: str = "speed") -> np.ndarray:
    """Relative speed of every bin as float64[m] (finite, > 0); ``None`` means all 1.0."""
    if speed is None:
        return np.ones(m, dtype=np.float64)
    arr = _per_bin(speed, m, name).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{name}[{j}] = {float(arr[j])}; speeds must be finite and > 0 (1.0 = nominal)")
    return arr


def as_pp_weight(pp_weight: object | None, m: int, name: str = "pp_weight") -> np.ndarray:
    """Weight of a bin's largest item as float64[m] (finite, >= 0); ``None`` means all 0."""
    if pp_weight is None:
        return np.zeros(m, dtype=np.float64)
    arr = _per_bin(pp_weight, m, name).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{name}[{j}] = {float(arr[j])}; the pipeline weight must be finite and >= 0 (pp - 1)")
    return arr


def as_bin_capacity(bin_capacity: object | None, m: int, name: str = "bin_capacity") -> np.ndarray:
    """Token capacity of every bin as int64[m] (>= 1); ``None`` means unlimited."""
    if bin_capacity is None:
        return np.full(m, UNLIMITED_TOKENS, dtype=np.int64)
    arr = _integers(_per_bin(bin_capacity, m, name), name, "tokens")
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{name}[{j}] = {int(arr[j])} tokens; a bin must hold at least 1 token")
    return np.minimum(arr, UNLIMITED_TOKENS)


def check_eligible(times: np.ndarray, bin_type: np.ndarray, sizes: np.ndarray, bin_capacity: np.ndarray) -> None:
    """Raise unless every item has at least one bin it may go to.

    Item ``i`` may go to bin ``j`` when ``times[i, bin_type[j]]`` is finite and
    ``sizes[i] <= bin_capacity[j]``.
    """
    n, num_types = times.shape
    if sizes.shape[0] != n:
        raise ValueError(f"sizes has {sizes.shape[0]} items but times has {n} rows; give one size per item")
    type_cap = np.full(num_types, -1, dtype=np.int64)  # largest capacity per type; -1 = type absent
    np.maximum.at(type_cap, bin_type, bin_capacity)
    finite = np.isfinite(times) & (type_cap >= 0)[None, :]
    ok = finite & (sizes[:, None] <= type_cap[None, :])
    bad = np.flatnonzero(~ok.any(axis=1))
    if not bad.size:
        return
    i = int(bad[0])
    present = np.flatnonzero(type_cap >= 0)
    if not finite[i].any():
        raise ValueError(
            f"item {i} has time inf on every bin type present (types {present.tolist()}); "
            "it is eligible for no bin: add a bin of a type that can run it, or drop/split the item"
        )
    types = np.flatnonzero(finite[i])
    raise ValueError(
        f"item {i} has {int(sizes[i])} tokens, above the capacity of every bin it is eligible for "
        f"(largest: {int(type_cap[types].max())} tokens on types {types.tolist()}); "
        "raise the capacity or split/truncate the item"
    )


def as_hint(hint: object, n: int, m: int, name: str = "hint") -> np.ndarray:
    """A starting assignment as int64[n] with every entry in ``0 .. m-1``."""
    arr = np.asarray(hint)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must give one bin per item ({n}), got shape {arr.shape}")
    arr = _integers(arr, name, "bin indices")
    bad = np.flatnonzero((arr < 0) | (arr >= m))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] = {int(arr[i])} is not a bin index (there are {m} bins: 0..{m - 1})")
    return arr
