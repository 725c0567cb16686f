"""OR-tools CP-SAT models for makespan and min-max packing, warm-started by the greedy.

One model serves both problems (min-max packing is the one-type, speed-1 case). It is
built in the order data → variables → constraints → objective → hint → solve → decode.

Data: times are turned into integers ``cost_ij = floor(scale · times[i, k_j] / v_j)``
(and ``floor(scale · w_j · times[i, k_j] / v_j)`` for the pipeline term), with ``scale``
putting the greedy makespan at 10^7 units. Rounding *down* makes the integer model a
relaxation of the real one, so the solver's proven bound divided by ``scale`` is a valid
lower bound in seconds; the decoded answer is re-scored in exact float arithmetic.

Model (per bin class, bins are interchangeable, so their loads are ordered to break
symmetry; the greedy answer is relabelled to satisfy that order):

    x[i, j] ∈ {0, 1}   item i runs on bin j            (only for eligible pairs)
    top[j] >= wcost_ij · x[i, j]                         (pipeline term, bins with w_j > 0)
    load[j] = Σ_i cost_ij · x[i, j] + top[j]             (explicit load variables)
    makespan >= load[j];  minimise makespan
    Σ_j x[i, j] = 1                                      (every item exactly once)
    Σ_i sizes_i · x[i, j] <= capacity_j                  (where the capacity can bind)
    Σ_i x[i, j] >= 1                                     (require_nonempty: the bins the
                                                          greedy filled, i.e. all that
                                                          eligibility allows)

Large instances (more eligible pairs than ``max_model_pairs``) are not modelled whole:
a large-neighbourhood search repeatedly frees the items of the bottleneck bin plus
two bins that can run them (the least-loaded and a random one, bins of the bottleneck's
type preferred), solves that sub-model with the other bins fixed for 20 ms
(presolve off, so the hint is loaded at once), and keeps the answer when the freed
bins' largest load drops. No global bound is proven then (``bound=None``).

Budgets. ``time_limit`` is wall-clock seconds. ``deterministic_time`` (CP-SAT's
deterministic work units, roughly seconds of search on a reference machine) replaces it
when given: every solve is stopped by ``max_deterministic_time`` instead of the clock, the
LNS spends the budget round by round as the solver reports it, and with one worker the
answer depends only on (instance, hint, seed, budget): the same in every process and
under any load. Wall time then follows the machine (measured: ``benchmarks/packers.py``).

Every status is handled: OPTIMAL / FEASIBLE are decoded; INFEASIBLE, MODEL_INVALID and
UNKNOWN (time out before a solution) fall back to the greedy answer. The returned
answer is never worse than the hint: both are re-scored exactly and the better kept.
``.solver`` is ``"cpsat:<STATUS>"`` (``"cpsat-lns:<STATUS>"``) when CP-SAT's answer is
returned and ``"<greedy>;cpsat:<STATUS>"`` when the hint is kept; ``.status`` is the
solver status. With ``num_workers=1`` the search is sequential, but a wall-clock time
limit can still cut it at different points on a loaded machine; pass
``deterministic_time`` for answers that never depend on the clock.
"""

from __future__ import annotations

import time

import numpy as np

from packers._cpsat_model import Budget, count_pairs, model_data, run_model
from packers._search import improve
from packers._state import Instance, bin_loads, build_instance
from packers.makespan import default_rounds, makespan_instance, solve_instance
from packers.minmax import minmax_greedy, minmax_instance
from packers.types import Assignment
from packers.validate import as_hint

__all__ = ["cpsat_makespan", "cpsat_minmax_pack", "MAX_MODEL_PAIRS"]

MAX_MODEL_PAIRS = 6000
"""Default largest number of eligible (item, bin) pairs modelled whole; above it, LNS."""
_LNS_MAX_BINS = 3
"""Most bins freed per LNS round: the bottleneck and two partners. Small sub-models are
solved (or improved) within a round; 4-8 bins measured worse at 200 ms in total."""
_LNS_MIN_ROUND = 0.01
"""Seconds: stop the LNS when less time than this is left."""
_LNS_ROUND = 0.02
"""Seconds of solver time per LNS round (small neighbourhoods, presolve off: the hint is loaded at once)."""
_LNS_PAIRS = 600
"""Most eligible pairs per LNS neighbourhood (fewer bins when the bottleneck holds many items)."""
_LNS_MAX_ROUNDS = 100_000
"""Safety cap on LNS rounds (a round that spends no deterministic time cannot loop forever)."""


# ----------------------------------------------------------------------------------------
# large instances: large-neighbourhood search


def _sub_instance(inst: Instance, items: np.ndarray, bins: np.ndarray) -> Instance:
    return build_instance(
        np.ascontiguousarray(inst.times[items]), inst.bin_type[bins], inst.speed[bins], inst.pp_weight[bins],
        inst.sizes[items], inst.bin_capacity[bins],
    )


def _neighbourhood(inst: Instance, bin_of: np.ndarray, loads: np.ndarray, rng: np.random.Generator, max_pairs: int) -> np.ndarray:
    """The bottleneck bins, then bins whose type can run one of their items: alternately the
    least-loaded such bin and a random one (bins of a bottleneck type weigh double), while
    the freed items times the freed bins stay within ``max_pairs``."""
    counts = np.bincount(bin_of, minlength=inst.m)
    top = float(loads.max())
    chosen = [int(j) for j in np.flatnonzero(loads >= top * (1.0 - 1e-9))][:_LNS_MAX_BINS]
    freed = np.flatnonzero(np.isin(bin_of, chosen))
    useful = np.isfinite(inst.times[freed]).any(axis=0)  # types that can take a freed item
    hot = np.zeros(inst.times.shape[1], dtype=bool)
    hot[inst.bin_type[chosen]] = True
    taken = set(chosen)
    pool = [int(j) for j in np.argsort(loads, kind="stable") if int(j) not in taken and useful[inst.bin_type[j]]]
    pick_low = True
    while pool and len(chosen) < _LNS_MAX_BINS:
        if pick_low:
            j = pool.pop(0)
        else:
            weight = np.where(hot[inst.bin_type[pool]], 2.0, 1.0)
            j = pool.pop(int(rng.choice(len(pool), p=weight / weight.sum())))
        pick_low = not pick_low
        if (counts[chosen].sum() + counts[j]) * (len(chosen) + 1) > max_pairs and len(chosen) >= 2:
            break
        chosen.append(j)
    return np.array(sorted(chosen), dtype=np.int64)


def _lns(inst: Instance, start: np.ndarray, *, require_nonempty: bool, budget: Budget, seed: int, num_workers: int, max_pairs: int) -> tuple[np.ndarray, str, int]:
    """Returns (best bin_of, status summary, rounds improved).

    A wall-clock budget is spent by the clock (model building included); a deterministic
    one by the solver's reported deterministic time, so the rounds run are reproducible."""
    deadline = time.perf_counter() + budget.time_limit
    left_units = budget.amount
    rng = np.random.default_rng(seed)
    cur = start.copy()
    loads = bin_loads(inst.times, inst.bin_type, inst.speed, inst.pp_weight, cur)
    keep_nonempty = require_nonempty and inst.n >= inst.m
    statuses: list[str] = []
    improved = 0
    while len(statuses) < _LNS_MAX_ROUNDS:
        left = left_units if budget.deterministic else deadline - time.perf_counter()
        if left < _LNS_MIN_ROUND:
            break
        bins = _neighbourhood(inst, cur, loads, rng, max_pairs)
        items = np.flatnonzero(np.isin(cur, bins))
        if items.size == 0:
            break
        sub = _sub_instance(inst, items, bins)
        local_of = np.searchsorted(bins, cur[items]).astype(np.int64)
        old = float(loads[bins].max())
        data = model_data(sub, local_of, require_nonempty=keep_nonempty, reference=old)
        res = run_model(
            data, budget=budget, amount=min(left, _LNS_ROUND), seed=seed + len(statuses), num_workers=num_workers,
            presolve=False,
        )
        got, status = res.bin_of, res.status
        # at least the minimum round, so a solve that reports no work still ends the loop
        left_units -= max(res.spent, _LNS_MIN_ROUND / 4)
        statuses.append(status)
        if got is None:
            continue
        new_loads = bin_loads(sub.times, sub.bin_type, sub.speed, sub.pp_weight, got)
        if new_loads.max() < old * (1.0 - 1e-12):
            cur[items] = bins[got]
            loads[bins] = new_loads
            improved += 1
    if any(s in ("OPTIMAL", "FEASIBLE") for s in statuses):
        summary = "FEASIBLE"
    else:
        summary = statuses[-1] if statuses else "UNKNOWN"
    return cur, summary, improved


# ----------------------------------------------------------------------------------------
# entry points


def _check_hint(inst: Instance, hint: object) -> np.ndarray:
    h = as_hint(hint, inst.n, inst.m)
    t = inst.times[np.arange(inst.n), inst.bin_type[h]]
    bad = np.flatnonzero(~np.isfinite(t) | (inst.sizes > inst.bin_capacity[h]))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"hint[{i}] = {int(h[i])}: item {i} ({int(inst.sizes[i])} tokens) may not run on bin {int(h[i])} "
            f"(time {float(t[i])}, capacity {int(inst.bin_capacity[h[i]])} tokens); give an eligible bin"
        )
    used = np.bincount(h, weights=inst.sizes, minlength=inst.m)
    over = np.flatnonzero(used > inst.bin_capacity)
    if over.size:
        j = int(over[0])
        raise ValueError(f"the hint puts {int(used[j])} tokens on bin {j}, above its capacity {int(inst.bin_capacity[j])}")
    return h


def _solve(
    inst: Instance, hint: np.ndarray | None, hint_solver: str, *, require_nonempty: bool, budget: Budget,
    seed: int, num_workers: int, max_model_pairs: int,
) -> Assignment:

    def exact(b: np.ndarray) -> np.ndarray:
        return bin_loads(inst.times, inst.bin_type, inst.speed, inst.pp_weight, b)

    hint_loads = exact(hint) if hint is not None else None
    if count_pairs(inst) <= max_model_pairs or hint is None:
        reference = float(hint_loads.max()) if hint_loads is not None else float(
            np.where(np.isfinite(inst.times), inst.times, 0.0).max(initial=0.0)
        )
        data = model_data(inst, hint, require_nonempty=require_nonempty, reference=reference)
        res = run_model(data, budget=budget, amount=budget.amount, seed=seed, num_workers=num_workers)
        got, status, bound = res.bin_of, res.status, res.bound
        name = "cpsat"
        if got is not None and hint is None and require_nonempty and inst.n >= inst.m:
            got, _ = improve(inst, got, require_nonempty=True, local_search=False, max_rounds=0)
    else:
        got, status, _ = _lns(
            inst, hint, require_nonempty=require_nonempty, budget=budget, seed=seed,
            num_workers=num_workers, max_pairs=min(max_model_pairs, _LNS_PAIRS),
        )
        bound = None
        name = "cpsat-lns"
    if got is None and hint is None:
        raise ValueError(f"CP-SAT found no assignment (status {status}) and no greedy start exists; the instance may be infeasible")
    if got is not None:
        got_loads = exact(got)
        # exact float comparison: the full model's answer may tie the hint, LNS must beat it
        if hint_loads is None or got_loads.max() < hint_loads.max() or (name == "cpsat" and got_loads.max() == hint_loads.max()):
            return Assignment(bin_of=got, loads=got_loads, makespan=float(got_loads.max()), solver=f"{name}:{status}", bound=bound, status=status)
    return Assignment(
        bin_of=hint.copy(), loads=hint_loads, makespan=float(hint_loads.max()), solver=f"{hint_solver};{name}:{status}",
        bound=bound, status=status,
    )


def cpsat_makespan(
    times: np.ndarray,
    bin_type: np.ndarray,
    *,
    speed: np.ndarray | None = None,
    pp_weight: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
    bin_capacity: np.ndarray | None = None,
    require_nonempty: bool = True,
    hint: np.ndarray | None = None,
    time_limit: float = 0.2,
    seed: int = 0,
    num_workers: int = 1,
    max_model_pairs: int = MAX_MODEL_PAIRS,
    deterministic_time: float | None = None,
) -> Assignment:
    """Makespan assignment by CP-SAT, warm-started and never worse than the hint.

    Same instance arguments as :func:`packers.makespan.lpt_makespan`. ``hint`` (int64[n])
    defaults to the ``lpt_makespan`` answer. ``time_limit`` is in seconds (the whole call's
    solver time; model building adds to it), ``seed`` the solver's random seed,
    ``num_workers`` its threads (1 = sequential). ``deterministic_time`` (CP-SAT
    deterministic units) replaces the wall-clock limit and, with one worker, makes the
    answer independent of the clock and the machine's load. Instances with more than
    ``max_model_pairs`` eligible (item, bin) pairs are improved by LNS (module docstring).

    Returns an :class:`Assignment`; ``bound`` is CP-SAT's proven lower bound in seconds
    (full model only). Raises ``ValueError`` for bad input or an invalid hint.
    """
    budget = Budget(float(time_limit), None if deterministic_time is None else float(deterministic_time))
    budget.check(num_workers)
    inst = makespan_instance(times, bin_type, speed=speed, pp_weight=pp_weight, sizes=sizes, bin_capacity=bin_capacity)
    if hint is None:
        try:
            start = solve_instance(inst, require_nonempty=require_nonempty)
            h, hint_solver = start.bin_of, start.solver
        except ValueError:  # the greedy could not fit the capacities: let CP-SAT search alone
            h, hint_solver = None, "none"
    else:
        h, hint_solver = _check_hint(inst, hint), "hint"
    return _solve(
        inst, h, hint_solver, require_nonempty=require_nonempty, budget=budget, seed=seed,
        num_workers=num_workers, max_model_pairs=max_model_pairs,
    )


def cpsat_minmax_pack(
    times: np.ndarray,
    sizes: np.ndarray,
    num_bins: int,
    capacity: int,
    *,
    hint: np.ndarray | None = None,
    time_limit: float = 0.2,
    seed: int = 0,
    num_workers: int = 1,
    require_nonempty: bool = False,
    max_model_pairs: int = MAX_MODEL_PAIRS,
    deterministic_time: float | None = None,
) -> Assignment:
    """Min-max packing (see :func:`packers.minmax.minmax_pack`) by CP-SAT, never worse than the hint.

    ``hint`` defaults to the ``minmax_pack`` answer; budgets as in :func:`cpsat_makespan`.
    Raises ``ValueError`` for bad input, an invalid hint, or an instance no method can fit.
    """
    budget = Budget(float(time_limit), None if deterministic_time is None else float(deterministic_time))
    budget.check(num_workers)
    inst = minmax_instance(times, sizes, num_bins, capacity)
    if hint is None:
        try:
            start, rule = minmax_greedy(inst)
            h, _ = improve(inst, start, require_nonempty=require_nonempty, local_search=True, max_rounds=default_rounds(inst.n, inst.m))
            hint_solver = f"{rule}+ls"
        except ValueError:
            h, hint_solver = None, "none"
    else:
        h, hint_solver = _check_hint(inst, hint), "hint"
    return _solve(
        inst, h, hint_solver, require_nonempty=require_nonempty, budget=budget, seed=seed,
        num_workers=num_workers, max_model_pairs=max_model_pairs,
    )
