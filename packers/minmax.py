"""Min-max packing: items with times into exactly ``k`` identical bins under a token cap.

Used for pipeline micro-batches: a replica with pipeline degree ``pp`` runs ``k >= pp``
micro-batches, each holding at most ``capacity`` tokens, and its time grows with the
slowest micro-batch, so the goal is ``min max_j Σ_{i in j} times[i]`` subject to
``Σ_{i in j} sizes[i] <= capacity`` for every bin ``j``.

Algorithm (:func:`minmax_pack`), on the shared assignment kernels
(:mod:`packers._state`, ``_greedy``, ``_search``; one bin type, all speeds 1):

1. LPT by time: longest item first into the least-loaded bin with room.
2. If some item fits nowhere: largest-*size* first into the least-loaded bin with room;
   then largest-size first by best fit on tokens; then first-fit decreasing by tokens
   (FFD is the strongest of these at feasibility). If all fail, ``ValueError``.
3. Move/swap local search on the bottleneck bin, keeping every capacity.

Without a binding capacity, LPT alone is within ``4/3 − 1/(3k)`` of the optimum
(Graham 1969); the local search never makes it worse.
"""

from __future__ import annotations

import numpy as np

from packers._greedy import GreedyFailure, solve_greedy
from packers._search import improve
from packers._state import Instance, bin_loads, build_instance
from packers.binpack import first_fit_decreasing
from packers.makespan import default_rounds
from packers.types import Assignment
from packers.validate import as_capacity, as_item_times, as_num_bins, as_sizes

__all__ = ["minmax_pack", "minmax_instance", "minmax_greedy"]


def minmax_instance(times: np.ndarray, sizes: np.ndarray, num_bins: int, capacity: int) -> Instance:
    """Validate a min-max instance and build it as a one-type makespan instance."""
    t = as_item_times(times)
    s = as_sizes(sizes)
    k = as_num_bins(num_bins)
    cap = as_capacity(capacity)
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"sizes has {s.shape[0]} items but times has {t.shape[0]}; give one size per item")
    big = np.flatnonzero(s > cap)
    if big.size:
        i = int(big[0])
        raise ValueError(
            f"item {i} has {int(s[i])} tokens, above the capacity {cap}; raise the capacity or split/truncate the item"
        )
    total = int(s.sum())
    if total > k * cap:
        raise ValueError(
            f"{total} tokens cannot fit in {k} bins of {cap} tokens ({k * cap} in all); use more bins or a larger capacity"
        )
    return build_instance(
        np.ascontiguousarray(t[:, None]),
        np.zeros(k, dtype=np.int64),
        np.ones(k),
        np.zeros(k),
        s,
        np.full(k, cap, dtype=np.int64),
    )


def minmax_greedy(inst: Instance) -> tuple[np.ndarray, str]:
    """Greedy start for a min-max instance: the shared greedy rules, then FFD by tokens.

    Returns (bin_of, rule name); raises ``ValueError`` when no rule fits every item.
    """
    try:
        return solve_greedy(inst)
    except GreedyFailure as err:
        cap = int(inst.bin_capacity[0])
        ffd = first_fit_decreasing(inst.sizes, cap)
        if ffd.num_bins > inst.m:
            raise ValueError(
                f"could not fit {inst.n} items ({int(inst.sizes.sum())} tokens) into {inst.m} bins of "
                f"{cap} tokens: LPT, largest-size-first and best fit failed ({err}), "
                f"and first-fit decreasing needs {ffd.num_bins} bins; use more bins or a larger capacity"
            ) from None
        return ffd.bin_of.copy(), "ffd"


def minmax_pack(
    times: np.ndarray,
    sizes: np.ndarray,
    num_bins: int,
    capacity: int,
    local_search: bool = True,
    *,
    require_nonempty: bool = False,
    max_rounds: int | None = None,
) -> Assignment:
    """Pack items into exactly ``num_bins`` bins of ``capacity`` tokens, minimising the largest bin time.

    Args:
        times: float64[n] seconds per item (finite, >= 0).
        sizes: int64[n] tokens per item (>= 1).
        num_bins: number of bins k (>= 1); bins may stay empty unless ``require_nonempty``.
        capacity: most tokens per bin.
        local_search: run move/swap local search after the greedy.
        require_nonempty: when ``n >= k``, give every bin at least one item.
        max_rounds: local-search round limit (default ``256 + k // 2``).

    Returns:
        :class:`Assignment`; ``loads`` are per-bin time sums. ``solver`` names the greedy
        rule that fit (``"lpt"``, ``"lpt-by-size"``, ``"best-fit"``, ``"ffd"``) + ``"+ls"``.

    Raises:
        ValueError: empty or bad input (naming index, value and limit), an item above the
            capacity, more tokens than ``num_bins · capacity``, or no rule finding a fit.
    """
    inst = minmax_instance(times, sizes, num_bins, capacity)
    k = inst.m
    bin_of, rule = minmax_greedy(inst)
    rounds = default_rounds(inst.n, k) if max_rounds is None else int(max_rounds)
    if rounds < 0:
        raise ValueError(f"max_rounds={rounds} must be >= 0")
    bin_of, _ = improve(inst, bin_of, require_nonempty=require_nonempty, local_search=local_search, max_rounds=rounds)
    loads = bin_loads(inst.times, inst.bin_type, inst.speed, inst.pp_weight, bin_of)
    return Assignment(
        bin_of=bin_of, loads=loads, makespan=float(loads.max()), solver=f"{rule}+ls" if local_search else rule
    )
