"""Heterogeneous LPT + local search: feasibility invariants, repair, bounds, loads."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import packers as P
from packers.makespan import makespan_instance, solve_instance


@st.composite
def makespan_instances(draw, max_items=40, max_bins=8, capacity=False):
    n = draw(st.integers(1, max_items))
    m = draw(st.integers(1, max_bins))
    num_types = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    bin_type = rng.integers(0, num_types, size=m)
    lengths = rng.integers(1, 4000, size=n)
    a = rng.uniform(1e-8, 1e-6, size=num_types)
    b = rng.uniform(1e-4, 1e-3, size=num_types)
    max_len = rng.integers(500, 4000, size=num_types)
    times = a[None, :] * lengths[:, None] ** 2 + b[None, :] * lengths[:, None]
    times[lengths[:, None] > max_len[None, :]] = np.inf
    # keep every item eligible somewhere: the longest-capable present type takes everything
    present = np.unique(bin_type)
    times[:, present[np.argmax(max_len[present])]] = (a * lengths[:, None] ** 2 + b * lengths[:, None])[
        :, present[np.argmax(max_len[present])]
    ]
    speed = rng.uniform(0.5, 1.5, size=m) if draw(st.booleans()) else None
    pp_weight = rng.integers(0, 3, size=m).astype(float) if draw(st.booleans()) else None
    kw = dict(speed=speed, pp_weight=pp_weight)
    if capacity:
        # capacities from a random eligible assignment plus slack, so a feasible packing exists
        eligible = np.isfinite(times[:, bin_type])
        witness = np.array([rng.choice(np.flatnonzero(row)) for row in eligible])
        used = np.bincount(witness, weights=lengths, minlength=m).astype(np.int64)
        kw["sizes"] = lengths
        kw["bin_capacity"] = np.maximum(used + rng.integers(0, 2 * lengths.max(), size=m), 1)
    return times, bin_type, kw


def _check(a: P.Assignment, times, bin_type, kw) -> None:
    n, m = times.shape[0], bin_type.shape[0]
    assert a.bin_of.shape == (n,) and a.bin_of.dtype == np.int64
    assert ((a.bin_of >= 0) & (a.bin_of < m)).all()  # every item in exactly one bin
    assert np.isfinite(times[np.arange(n), bin_type[a.bin_of]]).all()  # eligibility
    loads = P.makespan_loads(times, bin_type, a.bin_of, kw.get("speed"), kw.get("pp_weight"))
    np.testing.assert_array_equal(loads, a.loads)
    assert a.makespan == loads.max()
    if "bin_capacity" in kw:
        used = np.bincount(a.bin_of, weights=kw["sizes"], minlength=m)
        assert (used <= kw["bin_capacity"]).all()


@settings(max_examples=80, deadline=None)
@given(makespan_instances())
def test_lpt_valid_and_above_bound(inst):
    times, bin_type, kw = inst
    a = P.lpt_makespan(times, bin_type, **kw)
    _check(a, times, bin_type, kw)
    lb = P.makespan_lower_bound(times, bin_type, speed=kw["speed"], pp_weight=kw["pp_weight"])
    assert lb <= a.makespan * (1 + 1e-12)
    if a.bound is not None:
        assert a.bound <= a.makespan * (1 + 1e-12)


@settings(max_examples=50, deadline=None)
@given(makespan_instances(capacity=True))
def test_lpt_respects_token_capacity(inst):
    """Feasible by construction; the greedy either packs within every capacity or says it could not."""
    times, bin_type, kw = inst
    try:
        a = P.lpt_makespan(times, bin_type, **kw)
    except ValueError as err:
        assert "could not place item" in str(err)
        return
    _check(a, times, bin_type, kw)


@settings(max_examples=60, deadline=None)
@given(makespan_instances())
def test_local_search_never_hurts(inst):
    times, bin_type, kw = inst
    inst_ = makespan_instance(times, bin_type, speed=kw["speed"], pp_weight=kw["pp_weight"])
    plain = solve_instance(inst_, local_search=False)
    searched = solve_instance(inst_, local_search=True)
    assert searched.makespan <= plain.makespan


@settings(max_examples=60, deadline=None)
@given(makespan_instances(max_items=30, max_bins=10))
def test_every_bin_gets_an_item_when_all_are_eligible(inst):
    times, bin_type, kw = inst
    times = np.where(np.isfinite(times), times, 1.0)  # everything eligible everywhere
    a = P.lpt_makespan(times, bin_type, **kw)
    counts = np.bincount(a.bin_of, minlength=bin_type.shape[0])
    if times.shape[0] >= bin_type.shape[0]:
        assert (counts >= 1).all()


def test_nonempty_repair_uses_augmenting_paths():
    # bins 0 and 1 are type 0, bin 2 is type 1. Only item 0 may use type 1, so bin 2 can
    # be filled only by moving item 0 there and giving its old bin another item.
    times = np.array([[10.0, 1.0], [1.0, np.inf], [1.0, np.inf]])
    a = P.lpt_makespan(times, np.array([0, 0, 1]))
    assert sorted(np.bincount(a.bin_of, minlength=3).tolist()) == [1, 1, 1]
    assert a.bin_of[0] == 2


def test_nonempty_when_eligibility_forbids_leaves_bin_empty():
    times = np.array([[1.0, np.inf], [1.0, np.inf], [1.0, np.inf]])  # nothing may use type 1
    a = P.lpt_makespan(times, np.array([0, 0, 1]))
    assert np.bincount(a.bin_of, minlength=3)[2] == 0


def test_require_nonempty_off_allows_empty_bins():
    times = np.array([[10.0], [1.0], [1.0]])
    a = P.lpt_makespan(times, np.array([0, 0, 0]), require_nonempty=False, speed=np.array([1.0, 1.0, 0.01]))
    assert np.bincount(a.bin_of, minlength=3)[2] == 0  # a bin 100x slower is better left idle


def test_pipeline_weight_counts_the_largest_item():
    times = np.array([[4.0], [1.0]])
    loads = P.makespan_loads(times, np.array([0]), np.array([0, 0]), pp_weight=np.array([2.0]))
    assert loads[0] == 4.0 + 1.0 + 2.0 * 4.0


def test_lp_guidance_beats_plain_lpt_on_comparative_advantage():
    """Long items are relatively cheap on type 0, short ones on type 1; plain LPT mixes them."""
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(2000, 4000, 40), rng.integers(50, 300, 400)]).astype(float)
    times = np.stack([2e-7 * lengths**2 + 1e-3 * lengths, 1e-6 * lengths**2 + 0.5e-3 * lengths], axis=1)
    bin_type = np.array([0] * 4 + [1] * 4)
    guided = P.lpt_makespan(times, bin_type)
    plain = P.lpt_makespan(times, bin_type, lp_guide=False)
    assert guided.makespan <= plain.makespan
    assert guided.makespan <= 1.02 * guided.bound


def test_single_item_and_single_bin():
    a = P.lpt_makespan(np.array([[2.0]]), np.array([0]), speed=np.array([2.0]))
    assert a.makespan == 1.0 and a.bin_of.tolist() == [0]
