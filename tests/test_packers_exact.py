"""Tiny instances (n <= 7, m <= 3) against brute force: CP-SAT is optimal, greedy and bounds sit on the right side."""

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import packers as P


def _brute_makespan(times, bin_type, speed, pp, nonempty):
    n, m = times.shape[0], bin_type.shape[0]
    best = np.inf
    for combo in itertools.product(range(m), repeat=n):
        a = np.array(combo)
        if not np.isfinite(times[np.arange(n), bin_type[a]]).all():
            continue
        if nonempty and n >= m and len(set(combo)) < m:
            continue
        best = min(best, P.makespan_loads(times, bin_type, a, speed, pp).max())
    return best


@st.composite
def tiny(draw):
    n = draw(st.integers(1, 7))
    m = draw(st.integers(1, 3))
    num_types = draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    times = rng.uniform(0.1, 10.0, size=(n, num_types)).round(3)
    times[rng.random((n, num_types)) < 0.25] = np.inf
    bin_type = rng.integers(0, num_types, size=m)
    for i in range(n):  # keep every item eligible for some bin
        if not np.isfinite(times[i, bin_type]).any():
            times[i, bin_type[0]] = 1.0
    speed = rng.choice([0.5, 1.0, 1.5], size=m)
    pp = rng.integers(0, 2, size=m).astype(float)
    return times, bin_type, speed, pp


@settings(max_examples=40, deadline=None)
@given(tiny())
def test_makespan_against_brute_force(inst):
    times, bin_type, speed, pp = inst
    # require_nonempty=False: "if eligibility allows" needs no matching argument here
    opt = _brute_makespan(times, bin_type, speed, pp, nonempty=False)
    greedy = P.lpt_makespan(times, bin_type, speed=speed, pp_weight=pp, require_nonempty=False)
    exact = P.cpsat_makespan(times, bin_type, speed=speed, pp_weight=pp, require_nonempty=False, time_limit=5.0)
    bound = P.makespan_lower_bound(times, bin_type, speed=speed, pp_weight=pp)
    assert bound <= opt * (1 + 1e-9)
    assert greedy.makespan >= opt * (1 - 1e-12)
    assert exact.makespan <= greedy.makespan
    assert exact.status == "OPTIMAL"
    # integer costs are floored at 1e-7 of the makespan, so "optimal" is optimal to that grain
    assert exact.makespan <= opt * (1 + 1e-6)
    assert exact.bound <= opt * (1 + 1e-9)


@settings(max_examples=25, deadline=None)
@given(tiny())
def test_nonempty_against_brute_force(inst):
    times, bin_type, speed, pp = inst
    times = np.where(np.isfinite(times), times, 2.0)  # all eligible: every bin can be filled
    n, m = times.shape[0], bin_type.shape[0]
    opt = _brute_makespan(times, bin_type, speed, pp, nonempty=True)
    greedy = P.lpt_makespan(times, bin_type, speed=speed, pp_weight=pp)
    exact = P.cpsat_makespan(times, bin_type, speed=speed, pp_weight=pp, time_limit=5.0)
    for a in (greedy, exact):
        if n >= m:
            assert (np.bincount(a.bin_of, minlength=m) >= 1).all()
        assert a.makespan >= opt * (1 - 1e-12)
    assert exact.makespan <= opt * (1 + 1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 7), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_minmax_against_brute_force(n, k, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 10, size=n)
    times = rng.uniform(0.1, 5.0, size=n).round(3)
    cap = int(max(sizes.max(), np.ceil(1.3 * sizes.sum() / k)))
    best = np.inf
    for combo in itertools.product(range(k), repeat=n):
        a = np.array(combo)
        if (np.bincount(a, weights=sizes, minlength=k) <= cap).all():
            best = min(best, np.bincount(a, weights=times, minlength=k).max())
    assert np.isfinite(best)
    bound = P.minmax_pack_lower_bound(times, sizes, k, cap)
    assert bound <= best * (1 + 1e-12)
    exact = P.cpsat_minmax_pack(times, sizes, k, cap, time_limit=5.0)
    assert exact.status == "OPTIMAL" and exact.makespan <= best * (1 + 1e-6)
    try:
        greedy = P.minmax_pack(times, sizes, k, cap)
    except ValueError:
        return
    assert greedy.makespan >= best * (1 - 1e-12) and exact.makespan <= greedy.makespan


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=6), st.integers(10, 14))
def test_bin_packing_bound_against_brute_force(sizes, cap):
    sizes = np.array(sizes)
    n = len(sizes)
    opt = n
    for k in range(1, n + 1):
        if any(
            (np.bincount(np.array(c), weights=sizes, minlength=k) <= cap).all()
            for c in itertools.product(range(k), repeat=n)
        ):
            opt = k
            break
    assert P.bin_packing_lower_bound(sizes, cap) <= opt <= P.first_fit_decreasing(sizes, cap).num_bins
