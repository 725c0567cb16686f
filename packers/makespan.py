"""Makespan on unrelated machines grouped in bin types: heterogeneous LPT + local search.

Items (sequences) go to bins (model replicas). A bin of type ``k`` runs item ``i`` in
``times[i, k]`` seconds (``inf`` = not eligible, e.g. too long for its memory). Bin ``j``
has a relative speed ``v_j``, a pipeline weight ``w_j`` (``pp - 1`` for a 1F1B pipeline:
the largest item also fills the bubble) and optionally a token capacity. Its load is

    load_j = (Σ_{i∈j} times[i, k_j] + w_j · max_{i∈j} times[i, k_j]) / v_j     (seconds)

and the goal is the smallest makespan ``max_j load_j``.

Algorithm (:func:`lpt_makespan`; kernels in ``_greedy`` and ``_search``):

1. **LP split** (``lp_guide``, more than one type): the LP by type of
   :mod:`packers.bounds` gives each item the types its fractional optimum uses (and the
   reported ``bound``).
2. **Greedy (LPT)**: items by decreasing *difficulty* — the smallest load the item alone
   would put on any bin it may go to. *LP-guided*: each to the allowed bin with the
   smallest projected load (resulting load plus the work still owed to that type by
   single-type items, over the type's speed). *Plain*: each to the eligible bin with the
   smallest resulting load. With >= 16 items per bin the LP-guided start is used (local
   search fixes its imbalance, not a poor type split); with fewer, the start with the
   smaller makespan. Bins of one class (same type, speed, weight, capacity) are
   interchangeable, so only each class's least-loaded bin is a candidate (a min-tree per
   class): ``O(n · (C + log m))`` for ``C`` classes. With token capacities, when an item
   fits nowhere, retry largest-size-first, then best fit by tokens.
3. **Non-empty repair** (``require_nonempty`` and ``n >= m``): every empty bin gets an
   item via an augmenting path (an item from a bin with >= 2 items, shifting single
   items along the way), so no replica idles when eligibility allows.
4. **Local search** on the bottleneck bin ``b``: the best move of one of its items to the
   least-loaded bin of a class; else the best *split* of ``b``'s and another type's
   least-loaded bin's items by time ratio (captures comparative advantage between types);
   else the best swap with the 4 least-loaded class roots; else splits and swaps with
   the 16 least-loaded bins of every type. A step must lower ``load_b`` by 1e-4 of it;
   rounds stop when none does or after ``max_rounds`` (default ``256 + m // 2``).

No approximation ratio is claimed for unrelated machines (LPT has none there); quality
is measured against :func:`packers.bounds.makespan_lower_bound` in
``benchmarks/packers.py``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from packers._greedy import solve_greedy
from packers._lp import type_lp
from packers._search import improve
from packers._state import Instance, bin_loads, build_instance
from packers.bounds import combined_makespan_bound
from packers.types import Assignment
from packers.validate import (
    as_bin_capacity,
    as_bin_type,
    as_hint,
    as_pp_weight,
    as_sizes,
    as_speed,
    as_times,
    check_eligible,
)

__all__ = ["lpt_makespan", "makespan_loads", "makespan_instance", "default_rounds"]


def default_rounds(n: int, m: int) -> int:
    """Default local-search round limit: ``256 + m // 2``.

    A round lowers the bottleneck bin once, so a plateau of ``m`` near-equal bins needs
    about ``m`` rounds to drop; past that the gains measured in ``benchmarks/packers.py``
    are small next to the cost (each round is tens of microseconds).
    """
    return 256 + m // 2


def makespan_instance(
    times: np.ndarray,
    bin_type: np.ndarray,
    *,
    speed: np.ndarray | None = None,
    pp_weight: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
    bin_capacity: np.ndarray | None = None,
) -> Instance:
    """Validate a makespan instance (see :func:`lpt_makespan`) and group its bins into classes."""
    t = as_times(times)
    n = t.shape[0]
    bt = as_bin_type(bin_type, t.shape[1])
    m = bt.shape[0]
    if bin_capacity is not None and sizes is None:
        raise ValueError("bin_capacity limits tokens per bin, so it needs sizes (tokens per item)")
    if sizes is None:
        sz = np.zeros(n, dtype=np.int64)
    else:
        sz = as_sizes(sizes)
        if sz.shape[0] != n:
            raise ValueError(f"sizes has {sz.shape[0]} items but times has {n} rows; give one size per item")
    cap = as_bin_capacity(bin_capacity, m)
    check_eligible(t, bt, sz, cap)
    return build_instance(t, bt, as_speed(speed, m), as_pp_weight(pp_weight, m), sz, cap)


def _assignment(inst: Instance, bin_of: np.ndarray, solver: str) -> Assignment:
    loads = bin_loads(inst.times, inst.bin_type, inst.speed, inst.pp_weight, bin_of)
    return Assignment(bin_of=bin_of, loads=loads, makespan=float(loads.max()), solver=solver)


def lp_allowed(inst: Instance, x: np.ndarray) -> np.ndarray:
    """Types each item may use in the LP-guided greedy: the support of the LP's
    fractional split, kept to types whose bins can hold the item's tokens (all
    eligible types for an item left with none)."""
    type_cap = np.full(inst.times.shape[1], -1, dtype=np.int64)
    np.maximum.at(type_cap, inst.bin_type, inst.bin_capacity)
    eligible = np.isfinite(inst.times) & (inst.sizes[:, None] <= type_cap[None, :])
    allowed = (x > 1e-9) & eligible
    none = ~allowed.any(axis=1)
    allowed[none] = eligible[none]
    return allowed


def solve_instance(
    inst: Instance,
    *,
    require_nonempty: bool = True,
    local_search: bool = True,
    max_rounds: int | None = None,
    lp_guide: bool = True,
    lp: tuple[float, np.ndarray] | None = None,
) -> Assignment:
    """Greedy + repair + local search on a validated instance (the body of :func:`lpt_makespan`).

    ``lp``: ``(value, x)`` from :func:`packers._lp.type_lp` on this instance's times, bin
    types and speeds, when the caller solved it already (e.g. for a bound); used instead
    of solving the LP again (same answer, so the same assignment)."""
    if max_rounds is None:
        max_rounds = default_rounds(inst.n, inst.m)
    if max_rounds < 0:
        raise ValueError(f"max_rounds={max_rounds} must be >= 0")
    allowed = None
    bound = None
    if lp_guide and np.unique(inst.bin_type).shape[0] > 1:
        if lp is None:
            value, x, _ = type_lp(inst.times, inst.bin_type, inst.speed)
        else:
            value, x = float(lp[0]), np.asarray(lp[1])
            if x.shape != inst.times.shape:
                raise ValueError(f"lp: x has shape {x.shape} but times has {inst.times.shape}; pass type_lp's x for these times")
        allowed = lp_allowed(inst, x)
        # the LP is solved anyway: report its bound (the pigeonhole terms of
        # makespan_lower_bound cost another millisecond and are left to that function)
        bound = combined_makespan_bound(inst.times, inst.bin_type, inst.speed, inst.pp_weight, value, pigeonhole=False)
    bin_of, rule = solve_greedy(inst, allowed)
    bin_of, _ = improve(inst, bin_of, require_nonempty=require_nonempty, local_search=local_search, max_rounds=max_rounds)
    result = _assignment(inst, bin_of, f"{rule}+ls" if local_search else rule)
    return replace(result, bound=bound)


def lpt_makespan(
    times: np.ndarray,
    bin_type: np.ndarray,
    *,
    speed: np.ndarray | None = None,
    pp_weight: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
    bin_capacity: np.ndarray | None = None,
    require_nonempty: bool = True,
    local_search: bool = True,
    max_rounds: int | None = None,
    lp_guide: bool = True,
    lp: tuple[float, np.ndarray] | None = None,
) -> Assignment:
    """Assign every item to one bin, heuristically minimising the makespan (seconds).

    Args:
        times: float64[n, K], seconds of item i on a bin of type k; ``inf`` = not eligible.
            A 1-D array means one type.
        bin_type: int64[m], the type (column of ``times``) of every bin.
        speed: float64[m] relative bin speeds (> 0; default 1).
        pp_weight: float64[m] weight of a bin's largest item (>= 0; default 0; ``pp - 1``).
        sizes: int64[n] tokens per item (needed with ``bin_capacity``).
        bin_capacity: int64[m] most tokens a bin may take in total (default unlimited).
        require_nonempty: when ``n >= m``, give every bin at least one item where
            eligibility allows (bins no item may reach stay empty).
        local_search: run move/swap local search after the greedy.
        max_rounds: local-search round limit (default :func:`default_rounds`).

        lp_guide: solve the LP by type and start from the LP-guided greedy (more than one
            bin type present); also fills ``bound``.
        lp: ``(value, x)`` of :func:`packers._lp.type_lp` on exactly these ``times``,
            ``bin_type`` and ``speed``, when already solved (skips solving it again).

    Returns:
        :class:`Assignment` with exact loads. ``solver`` names the greedy start and
        ``+ls``: ``"lp-lpt+ls"``, ``"lpt+ls"``, or a fallback used under tight capacities
        (``"lpt-by-size+ls"``, ``"best-fit+ls"``). With the LP, ``bound`` = max(single
        item, volume, LP by type) — :func:`packers.bounds.makespan_lower_bound` adds the
        eligibility pigeonhole terms on top.

    Raises:
        ValueError: empty input, bad shapes or values (naming index, value and limit), an
            item eligible for no bin, or no greedy rule fitting all items under capacities.
    """
    inst = makespan_instance(times, bin_type, speed=speed, pp_weight=pp_weight, sizes=sizes, bin_capacity=bin_capacity)
    return solve_instance(
        inst, require_nonempty=require_nonempty, local_search=local_search, max_rounds=max_rounds, lp_guide=lp_guide, lp=lp
    )


def makespan_loads(
    times: np.ndarray,
    bin_type: np.ndarray,
    bin_of: np.ndarray,
    speed: np.ndarray | None = None,
    pp_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Loads float64[m] (seconds) of any assignment ``bin_of`` (int64[n]).

    A bin holding an item it is not eligible for gets load ``inf``; an empty bin 0.
    """
    t = as_times(times)
    bt = as_bin_type(bin_type, t.shape[1])
    m = bt.shape[0]
    b = as_hint(bin_of, t.shape[0], m, name="bin_of")
    return bin_loads(t, bt, as_speed(speed, m), as_pp_weight(pp_weight, m), b)
