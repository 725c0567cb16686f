"""Lower bounds: the LP by type matches an independent GLOP solve; every bound stays valid."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from ortools.linear_solver import pywraplp

import packers as P
from packers._lp import type_lp
from packers.bounds import bin_packing_makespan_bound, eligibility_pigeonhole_bound, pigeonhole_sum


def _glop_type_lp(times, bin_type, speed):
    """The primal LP of the module docstring, solved directly by GLOP (reference)."""
    n, num_types = times.shape
    cap = np.bincount(bin_type, weights=speed, minlength=num_types)
    solver = pywraplp.Solver.CreateSolver("GLOP")
    inf = solver.infinity()
    makespan = solver.NumVar(0, inf, "T")
    rows = {}
    for k in np.flatnonzero(cap > 0):
        rows[k] = solver.Constraint(-inf, 0)
        rows[k].SetCoefficient(makespan, -float(cap[k]))
    for i in range(n):
        one = solver.Constraint(1, 1)
        for k in rows:
            if np.isfinite(times[i, k]):
                x = solver.NumVar(0, 1, "")
                one.SetCoefficient(x, 1)
                rows[k].SetCoefficient(x, float(times[i, k]))
    solver.Minimize(makespan)
    assert solver.Solve() == pywraplp.Solver.OPTIMAL
    return makespan.solution_value()


@st.composite
def lp_instances(draw):
    n = draw(st.integers(1, 60))
    num_types = draw(st.integers(1, 4))
    m = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    times = rng.uniform(0.01, 5.0, size=(n, num_types))
    times[rng.random((n, num_types)) < 0.3] = np.inf
    bin_type = rng.integers(0, num_types, size=m)
    for i in range(n):
        if not np.isfinite(times[i, bin_type]).any():
            times[i, bin_type[0]] = rng.uniform(0.01, 5.0)
    speed = rng.uniform(0.5, 2.0, size=m)
    return times, bin_type, speed


@settings(max_examples=40, deadline=None)
@given(lp_instances())
def test_cutting_plane_lp_matches_glop(inst):
    times, bin_type, speed = inst
    value, x, _ = type_lp(times, bin_type, speed, tol=1e-9, max_cuts=200)
    ref = _glop_type_lp(times, bin_type, speed)
    assert value <= ref * (1 + 1e-7)  # a dual value never exceeds the LP optimum
    assert value >= ref * (1 - 1e-6)  # and the cutting planes converge to it
    # the recovered fractional assignment is complete and uses eligible types only
    np.testing.assert_allclose(x.sum(axis=1), 1.0, rtol=1e-9)
    assert (x[~np.isfinite(times)] == 0).all()


@settings(max_examples=40, deadline=None)
@given(lp_instances())
def test_makespan_bound_below_heuristic(inst):
    times, bin_type, speed = inst
    bound = P.makespan_lower_bound(times, bin_type, speed=speed)
    assert bound <= P.lpt_makespan(times, bin_type, speed=speed, require_nonempty=False).makespan * (1 + 1e-12)


def test_pigeonhole_sum():
    assert pigeonhole_sum(np.array([5.0, 4.0, 3.0]), 2) == 7.0  # the 2 smallest of the top 3
    assert pigeonhole_sum(np.array([5.0, 4.0]), 2) == 0.0
    # max over ℓ: ℓ = 1 gives 4 + 3 = 7, ℓ = 2 (top 5, 3 smallest) gives 3 + 2 + 1 = 6
    assert pigeonhole_sum(np.array([5.0, 4.0, 3.0, 2.0, 1.0]), 2) == 7.0
    assert pigeonhole_sum(np.array([9.0, 9.0, 9.0, 9.0, 9.0]), 2) == 27.0


def test_bin_packing_makespan_bound_catches_pairing():
    # 3 items of 6 on 2 bins: some bin holds two → T >= 12; L2 with T < 12 needs 3 bins
    b = bin_packing_makespan_bound(np.array([6.0, 6.0, 6.0]), 2, known=9.0)
    assert 11.9 <= b <= 12.0


def test_eligibility_pigeonhole_is_per_item_set():
    # items 0-2 may only use type 0 (one bin): they share it, T >= 3; the LP spreads them
    times = np.array([[1.0, np.inf], [1.0, np.inf], [1.0, np.inf], [1.0, 1.0]])
    bin_type = np.array([0, 1, 1, 1])
    assert eligibility_pigeonhole_bound(times, bin_type, np.ones(4)) >= 3.0 - 1e-9
    assert P.makespan_lower_bound(times, bin_type) >= 3.0 - 1e-9
    assert P.lpt_makespan(times, bin_type).makespan == 3.0


def test_single_item_bound_uses_pipeline_weight():
    times = np.array([[4.0], [1.0]])
    bound = P.makespan_lower_bound(times, np.array([0, 0]), pp_weight=np.array([1.0, 1.0]))
    assert bound == 8.0  # the 4 s item counted twice on its pipeline bin


def test_bin_packing_bound_values():
    assert P.bin_packing_lower_bound(np.array([10, 10, 10]), 10) == 3
    assert P.bin_packing_lower_bound(np.array([4, 4, 4, 4]), 10) == 2
    assert P.bin_packing_lower_bound(np.array([7, 6, 5, 4, 3, 2]), 10) >= 3
