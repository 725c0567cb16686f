"""The CP-SAT model of :mod:`packers.cpsat`: data → variables → constraints → objective → hint → solve → decode.

One model serves makespan and min-max packing (the one-type, speed-1 case); the module
docstring of :mod:`packers.cpsat` gives the formulation, the integer scaling and the
budgets. Used whole for small instances and on sub-instances by the LNS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    from ortools.sat.python import cp_model
except ImportError as _missing:  # CP-SAT is optional at import: the greedy paths need only numpy and numba
    cp_model = None
    _ORTOOLS_ERROR: ImportError | None = _missing
else:
    _ORTOOLS_ERROR = None

from packers._state import Instance
from packers.validate import UNLIMITED_TOKENS

__all__ = ["Budget", "CpsatData", "CpsatVars", "ModelResult", "count_pairs", "model_data", "run_model"]

_UNITS = 10_000_000
"""Integer units the reference makespan is scaled to (fine enough: one unit = 1e-7 of it)."""


@dataclass(frozen=True, slots=True)
class Budget:
    """How long CP-SAT may search: wall seconds, or deterministic work units when given."""

    time_limit: float
    """Seconds of wall-clock time (ignored when ``deterministic_time`` is set)."""
    deterministic_time: float | None = None
    """CP-SAT deterministic time units; makes every stop independent of the clock."""

    @property
    def deterministic(self) -> bool:
        return self.deterministic_time is not None

    @property
    def amount(self) -> float:
        """The budget in its own unit (seconds or deterministic units)."""
        return float(self.deterministic_time if self.deterministic_time is not None else self.time_limit)

    def check(self, num_workers: int) -> None:
        if not (np.isfinite(self.time_limit) and self.time_limit >= 0):
            raise ValueError(f"time_limit={self.time_limit} s must be a finite number >= 0")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0 (0 = all cores)")
        if self.deterministic_time is not None:
            if not (np.isfinite(self.deterministic_time) and self.deterministic_time >= 0):
                raise ValueError(f"deterministic_time={self.deterministic_time} must be a finite number >= 0 (e.g. 0.1)")
            if num_workers != 1:
                raise ValueError(
                    f"deterministic_time needs one worker for a reproducible search; got num_workers={num_workers} (set 1)"
                )

    def apply(self, params: object, amount: float) -> None:
        """Set ``amount`` of this budget's unit as the solve's only limit."""
        if self.deterministic:
            params.max_deterministic_time = max(float(amount), 0.0)  # type: ignore[attr-defined]
        else:
            params.max_time_in_seconds = max(float(amount), 0.0)  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------
# data


@dataclass(frozen=True, slots=True, kw_only=True)
class CpsatData:
    """Integer data of one model (full instance or LNS sub-instance)."""

    inst: Instance
    scale: float
    """Integer units per second."""
    pair_item: np.ndarray
    """int64[p]: item of every eligible pair."""
    pair_bin: np.ndarray
    """int64[p]: bin of every eligible pair."""
    cost: np.ndarray
    """int64[p]: floor(scale · t / v) of the pair."""
    wcost: np.ndarray
    """int64[p]: floor(scale · w · t / v) of the pair (0 where w = 0)."""
    hint: np.ndarray | None
    """int64[n]: starting assignment, relabelled so loads are non-increasing within classes."""
    upper: int
    """Upper bound on the makespan in units (the hint's, else a trivial one)."""
    nonempty: np.ndarray
    """int64[]: bins that must receive an item."""
    capacity_bins: np.ndarray
    """int64[]: bins whose token capacity can bind."""


def _eligible_pairs(inst: Instance) -> tuple[np.ndarray, np.ndarray]:
    t = inst.times[:, inst.bin_type]  # (n, m) — only called for models small enough
    ok = np.isfinite(t) & (inst.sizes[:, None] <= inst.bin_capacity[None, :])
    item, b = np.nonzero(ok)
    return item.astype(np.int64), b.astype(np.int64)


def count_pairs(inst: Instance) -> int:
    """Eligible pairs, counted per class without an (n, m) temporary."""
    total = 0
    for c in range(inst.cls_type.shape[0]):
        ok = np.isfinite(inst.times[:, inst.cls_type[c]]) & (inst.sizes <= inst.cls_cap[c])
        total += int(ok.sum()) * int(inst.cls_ptr[c + 1] - inst.cls_ptr[c])
    return total


def _scaled_loads(data_cost: np.ndarray, data_wcost: np.ndarray, pair_of: np.ndarray, pair_bin: np.ndarray, m: int) -> np.ndarray:
    """Integer loads of the assignment given by the chosen pair of every item."""
    s = np.bincount(pair_bin[pair_of], weights=data_cost[pair_of], minlength=m)
    top = np.zeros(m)
    np.maximum.at(top, pair_bin[pair_of], data_wcost[pair_of])
    return (s + top).astype(np.int64)


def _relabel_by_class(inst: Instance, hint: np.ndarray, loads: np.ndarray) -> np.ndarray:
    """Permute bins inside each class so that loads are non-increasing along the class."""
    counts = np.bincount(hint, minlength=inst.m)
    new_of_old = np.arange(inst.m)
    for c in range(inst.cls_type.shape[0]):
        bins = inst.cls_bins[inst.cls_ptr[c] : inst.cls_ptr[c + 1]]
        order = bins[np.lexsort((bins, -counts[bins], -loads[bins]))]
        new_of_old[order] = bins
    return new_of_old[hint]


def model_data(inst: Instance, hint: np.ndarray | None, *, require_nonempty: bool, reference: float) -> CpsatData:
    """Integer data: eligible pairs, floored costs, relabelled hint, forced-nonempty bins.

    ``reference`` (seconds, > 0) is mapped to ``_UNITS`` integer units.
    """
    item, b = _eligible_pairs(inst)
    scale = _UNITS / reference if reference > 0 else 1.0
    t = inst.times[item, inst.bin_type[b]] / inst.speed[b]
    cost = np.floor(scale * t).astype(np.int64)
    wcost = np.floor(scale * inst.pp_weight[b] * t).astype(np.int64)
    m = inst.m
    upper = int(cost.sum() + wcost.max(initial=0))  # no load can exceed every pair's cost
    nonempty = np.zeros(0, dtype=np.int64)
    if hint is not None:
        key = item * m + b  # increasing: np.nonzero walks row by row
        rows = np.arange(inst.n) * m
        hint = _relabel_by_class(inst, hint, _scaled_loads(cost, wcost, np.searchsorted(key, rows + hint), b, m))
        upper = int(_scaled_loads(cost, wcost, np.searchsorted(key, rows + hint), b, m).max())
        if require_nonempty and inst.n >= m:
            nonempty = np.flatnonzero(np.bincount(hint, minlength=m) > 0).astype(np.int64)
    token_room = np.bincount(b, weights=inst.sizes[item], minlength=m)
    capacity_bins = np.flatnonzero((inst.bin_capacity < UNLIMITED_TOKENS) & (token_room > inst.bin_capacity)).astype(np.int64)
    return CpsatData(
        inst=inst, scale=scale, pair_item=item, pair_bin=b, cost=cost, wcost=wcost, hint=hint,
        upper=max(upper, 0), nonempty=nonempty, capacity_bins=capacity_bins,
    )


# ----------------------------------------------------------------------------------------
# model


@dataclass(frozen=True, slots=True)
class CpsatVars:
    x: list[cp_model.IntVar]
    """x[p] = 1 if pair p is used: item pair_item[p] runs on bin pair_bin[p]."""
    load: list[cp_model.IntVar]
    """load[j] = integer load of bin j (units)."""
    top: dict[int, cp_model.IntVar]
    """top[j] = weighted largest item time on pipeline bin j (units), bins with w_j > 0."""
    makespan: cp_model.IntVar
    """The largest load (units)."""


def new_variables(model: cp_model.CpModel, data: CpsatData) -> CpsatVars:
    m = data.inst.m
    x = [model.new_bool_var(f"x{p}") for p in range(data.pair_item.shape[0])]
    load = [model.new_int_var(0, data.upper, f"load{j}") for j in range(m)]
    top = {int(j): model.new_int_var(0, data.upper, f"top{j}") for j in np.flatnonzero(data.inst.pp_weight > 0)}
    makespan = model.new_int_var(0, data.upper, "makespan")
    return CpsatVars(x=x, load=load, top=top, makespan=makespan)


def add_constraints(model: cp_model.CpModel, data: CpsatData, v: CpsatVars) -> None:
    inst = data.inst
    by_item = np.argsort(data.pair_item, kind="stable")
    item_ptr = np.searchsorted(data.pair_item[by_item], np.arange(inst.n + 1))
    by_bin = np.argsort(data.pair_bin, kind="stable")
    bin_ptr = np.searchsorted(data.pair_bin[by_bin], np.arange(inst.m + 1))
    # every item runs on exactly one of its eligible bins
    for i in range(inst.n):
        model.add_exactly_one([v.x[p] for p in by_item[item_ptr[i] : item_ptr[i + 1]]])
    for j in range(inst.m):
        pairs = by_bin[bin_ptr[j] : bin_ptr[j + 1]]
        xs = [v.x[p] for p in pairs]
        # load[j] is the bin's summed cost plus its pipeline term; the makespan covers it
        expr = cp_model.LinearExpr.weighted_sum(xs, data.cost[pairs].tolist())
        if j in v.top:
            for p in pairs:  # top[j] is at least the weighted cost of every item on j
                if data.wcost[p] > 0:
                    model.add(v.top[j] >= int(data.wcost[p]) * v.x[p])
            expr = expr + v.top[j]
        model.add(v.load[j] == expr)
        model.add(v.load[j] <= v.makespan)
    # token capacity, only where the eligible items could exceed it
    for j in data.capacity_bins:
        pairs = by_bin[bin_ptr[j] : bin_ptr[j + 1]]
        model.add(
            cp_model.LinearExpr.weighted_sum([v.x[p] for p in pairs], inst.sizes[data.pair_item[pairs]].tolist())
            <= int(inst.bin_capacity[j])
        )
    # bins the greedy could fill stay non-empty
    for j in data.nonempty:
        model.add_at_least_one([v.x[p] for p in by_bin[bin_ptr[j] : bin_ptr[j + 1]]])
    # symmetry: interchangeable bins (one class) carry non-increasing loads
    for c in range(inst.cls_type.shape[0]):
        bins = inst.cls_bins[inst.cls_ptr[c] : inst.cls_ptr[c + 1]]
        for a, b in zip(bins[:-1], bins[1:], strict=True):
            model.add(v.load[int(a)] >= v.load[int(b)])


def set_objective(model: cp_model.CpModel, v: CpsatVars) -> None:
    model.minimize(v.makespan)


def add_hint(model: cp_model.CpModel, data: CpsatData, v: CpsatVars) -> None:
    """Hint every variable with the (relabelled) greedy answer."""
    if data.hint is None:
        return
    chosen = data.hint[data.pair_item] == data.pair_bin
    for p, var in enumerate(v.x):
        model.add_hint(var, bool(chosen[p]))
    used = np.flatnonzero(chosen)
    m = data.inst.m
    cost_sum = np.bincount(data.pair_bin[used], weights=data.cost[used], minlength=m).astype(np.int64)
    top = np.zeros(m, dtype=np.int64)
    np.maximum.at(top, data.pair_bin[used], data.wcost[used])
    loads = cost_sum + np.where(data.inst.pp_weight > 0, top, 0)
    for j in range(m):
        model.add_hint(v.load[j], int(loads[j]))
    for j, var in v.top.items():
        model.add_hint(var, int(top[j]))
    model.add_hint(v.makespan, int(loads.max()))


def solve(
    model: cp_model.CpModel, *, budget: Budget, amount: float, seed: int, num_workers: int, presolve: bool = True
) -> tuple[cp_model.CpSolver, str]:
    solver = cp_model.CpSolver()
    budget.apply(solver.parameters, amount)
    solver.parameters.random_seed = int(seed)
    solver.parameters.num_workers = int(num_workers)
    solver.parameters.cp_model_presolve = presolve
    solver.parameters.log_search_progress = False
    status = solver.solve(model)
    return solver, solver.status_name(status)


def decode(solver: cp_model.CpSolver, data: CpsatData, v: CpsatVars) -> np.ndarray:
    bin_of = np.full(data.inst.n, -1, dtype=np.int64)
    for p, var in enumerate(v.x):
        if solver.boolean_value(var):
            bin_of[data.pair_item[p]] = data.pair_bin[p]
    assert (bin_of >= 0).all(), "CP-SAT returned an item without a bin"
    return bin_of


@dataclass(frozen=True, slots=True)
class ModelResult:
    bin_of: np.ndarray | None
    """The decoded assignment, or None when no solution was found."""
    status: str
    bound: float | None
    """Proven lower bound in seconds (None without a solution)."""
    spent: float
    """Budget used, in the budget's unit (wall seconds or deterministic units)."""


def run_model(
    data: CpsatData, *, budget: Budget, amount: float, seed: int, num_workers: int, presolve: bool = True
) -> ModelResult:
    """Build, solve, decode, with ``amount`` of ``budget``'s unit as the limit."""
    if cp_model is None:
        raise ImportError(
            f"CP-SAT needs OR-tools, which is not installed ({_ORTOOLS_ERROR}); `pip install ortools`, "
            "or plan without CP-SAT refinement (BalancerConfig(refine='none'), the default)"
        )
    model = cp_model.CpModel()
    v = new_variables(model, data)
    add_constraints(model, data, v)
    set_objective(model, v)
    add_hint(model, data, v)
    solver, status = solve(model, budget=budget, amount=amount, seed=seed, num_workers=num_workers, presolve=presolve)
    spent = float(solver.deterministic_time if budget.deterministic else solver.wall_time)
    if status in ("OPTIMAL", "FEASIBLE"):
        return ModelResult(decode(solver, data, v), status, float(solver.best_objective_bound) / data.scale, spent)
    return ModelResult(None, status, None, spent)
