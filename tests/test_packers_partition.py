"""Karmarkar–Karp k-way partition (largest differencing method), plain and balanced."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import packers as P

values_st = st.lists(st.floats(0, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=80).map(np.array)


@settings(max_examples=150, deadline=None)
@given(values_st, st.integers(1, 12), st.booleans())
def test_every_item_once_and_sums_match(values, k, equal):
    a = P.karmarkar_karp(values, k, equal_counts=equal)
    assert a.bin_of.shape == values.shape and ((a.bin_of >= 0) & (a.bin_of < k)).all()
    np.testing.assert_allclose(a.loads, np.bincount(a.bin_of, weights=values, minlength=k), rtol=1e-12)
    assert a.bound <= a.makespan * (1 + 1e-12) + 1e-9


@settings(max_examples=150, deadline=None)
@given(values_st, st.integers(1, 12))
def test_equal_counts_cardinalities_differ_by_at_most_one(values, k):
    counts = np.bincount(P.karmarkar_karp(values, k, equal_counts=True).bin_of, minlength=k)
    assert counts.max() - counts.min() <= 1


def test_classic_two_way():
    # LDM on {8,7,6,5,4}: 8-7=1, 6-5=1, 4-1=3, 3-1=2 → difference 2 (sums 16 and 14)
    a = P.karmarkar_karp(np.array([8.0, 7.0, 6.0, 5.0, 4.0]), 2)
    assert sorted(a.loads.tolist()) == [14.0, 16.0]


def test_three_way_finds_the_optimum_on_a_small_case():
    a = P.karmarkar_karp(np.array([8.0, 7.0, 6.0, 5.0, 4.0]), 3)
    assert a.makespan == 11.0  # optimal: {8}, {7,4}, {6,5} → max 11


def test_more_bins_than_items():
    a = P.karmarkar_karp(np.array([3.0, 1.0]), 5)
    assert sorted(np.bincount(a.bin_of, minlength=5).tolist()) == [0, 0, 0, 1, 1]
    assert a.makespan == 3.0


def test_balanced_partition_is_tight_on_uniform_values():
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 1, size=400)
    for equal in (False, True):
        a = P.karmarkar_karp(v, 8, equal_counts=equal)
        assert a.makespan <= 1.001 * a.bound


def test_balanced_bound_counts_the_items_beside_the_largest():
    v = np.array([100.0] + [1.0] * 15)
    a = P.karmarkar_karp(v, 4, equal_counts=True)  # 4 items per bin: 100 + 3 ones
    assert a.bound == 103.0 == a.makespan
