"""First-fit / best-fit decreasing and next-fit: valid packings, reference behaviour, bounds."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import packers as P
from packers.binpack import _best_fit, decreasing_order


def _naive_first_fit(sizes: np.ndarray, cap: int) -> tuple[np.ndarray, int]:
    """Quadratic first-fit decreasing, ties by index: the definition the kernel must match."""
    order = np.argsort(-sizes, kind="stable")
    residual: list[int] = []
    bin_of = np.empty(len(sizes), dtype=np.int64)
    for i in order:
        for j, r in enumerate(residual):
            if r >= sizes[i]:
                residual[j] -= int(sizes[i])
                bin_of[i] = j
                break
        else:
            residual.append(cap - int(sizes[i]))
            bin_of[i] = len(residual) - 1
    return bin_of, len(residual)


def _naive_best_fit_count(sizes: np.ndarray, cap: int) -> int:
    order = np.argsort(-sizes, kind="stable")
    residual: list[int] = []
    for i in order:
        fits = [(r, j) for j, r in enumerate(residual) if r >= sizes[i]]
        if fits:
            r, j = min(fits)
            residual[j] -= int(sizes[i])
        else:
            residual.append(cap - int(sizes[i]))
    return len(residual)


def _naive_best_fit_fifo(sizes: np.ndarray, cap: int) -> np.ndarray:
    """BFD with TRL's / OLMo-core's tie rule: among bins with the best residual, the one
    that reached that residual first."""
    order = np.argsort(-sizes, kind="stable")
    residual: list[int] = []
    since: list[int] = []  # placement count when each bin reached its residual
    bin_of = np.empty(sizes.size, dtype=np.int64)
    for t, i in enumerate(order):
        fits = [(r, since[j], j) for j, r in enumerate(residual) if r >= sizes[i]]
        if fits:
            _, _, j = min(fits)
            residual[j] -= int(sizes[i])
            since[j] = t
        else:
            j = len(residual)
            residual.append(cap - int(sizes[i]))
            since.append(t)
        bin_of[i] = j
    return bin_of


instances = st.integers(1, 200).flatmap(
    lambda cap: st.tuples(st.lists(st.integers(1, cap), min_size=1, max_size=60).map(np.array), st.just(cap))
)


def _check_valid(p: P.BinPacking, sizes: np.ndarray, cap: int) -> None:
    assert p.bin_of.shape == sizes.shape and p.bin_of.dtype == np.int64
    assert p.bin_of.min() == 0 and p.bin_of.max() == p.num_bins - 1
    np.testing.assert_array_equal(np.bincount(p.bin_of, weights=sizes, minlength=p.num_bins), p.loads)
    assert (p.loads <= cap).all() and (p.loads > 0).all()
    assert sum(len(b) for b in p.bins()) == len(sizes)


@settings(max_examples=150, deadline=None)
@given(instances)
def test_ffd_matches_reference_and_bounds(inst):
    sizes, cap = inst
    p = P.first_fit_decreasing(sizes, cap)
    _check_valid(p, sizes, cap)
    ref_bins, ref_count = _naive_first_fit(sizes, cap)
    np.testing.assert_array_equal(p.bin_of, ref_bins)
    assert p.num_bins == ref_count
    lb = P.bin_packing_lower_bound(sizes, cap)
    assert -(-int(sizes.sum()) // cap) <= lb <= p.num_bins


@settings(max_examples=150, deadline=None)
@given(instances)
def test_bfd_matches_reference_count(inst):
    sizes, cap = inst
    p = P.best_fit_decreasing(sizes, cap)
    _check_valid(p, sizes, cap)
    # bins with equal residual capacity are interchangeable, so any tie rule gives this count
    assert p.num_bins == _naive_best_fit_count(sizes, cap)
    assert P.bin_packing_lower_bound(sizes, cap) <= p.num_bins


@settings(max_examples=150, deadline=None)
@given(instances)
def test_bfd_breaks_ties_oldest_first(inst):
    """Equal residuals go to the bin that reached that residual first (TRL, OLMo-core)."""
    sizes, cap = inst
    np.testing.assert_array_equal(P.best_fit_decreasing(sizes, cap).bin_of, _naive_best_fit_fifo(sizes, cap))


@settings(max_examples=60, deadline=None)
@given(instances, st.integers(1, 6))
def test_bfd_coarse_buckets_give_the_same_count(inst, shift):
    """Large capacities share residual buckets (2**shift values each); the count must not change."""
    sizes, cap = inst
    s = sizes.astype(np.int64)
    _, exact = _best_fit(decreasing_order(s), s, cap, 0)
    _, coarse = _best_fit(decreasing_order(s), s, cap, shift)
    assert exact == coarse


def test_bfd_large_capacity_path():
    rng = np.random.default_rng(0)
    cap = 3_000_000_000  # > 2**20 tokens: bucketed residuals
    sizes = rng.integers(1, cap, size=300)
    p = P.best_fit_decreasing(sizes, cap)
    _check_valid(p, sizes, cap)
    assert p.num_bins == _naive_best_fit_count(sizes, cap)


@settings(max_examples=100, deadline=None)
@given(instances)
def test_next_fit_keeps_order(inst):
    sizes, cap = inst
    p = P.next_fit(sizes, cap)
    _check_valid(p, sizes, cap)
    assert (np.diff(p.bin_of) >= 0).all()  # bins open in item order
    # adjacent bins could not have been merged: next item did not fit
    assert all(p.loads[j] + sizes[p.bin_of == j + 1][0] > cap for j in range(p.num_bins - 1))
    assert p.num_bins <= 2 * P.bin_packing_lower_bound(sizes, cap)


def test_decreasing_order_counting_and_argsort_agree():
    rng = np.random.default_rng(3)
    small = rng.integers(1, 50, size=1000)
    np.testing.assert_array_equal(decreasing_order(small), np.argsort(-small, kind="stable"))
    big = rng.integers(1, 10**9, size=1000)
    np.testing.assert_array_equal(decreasing_order(big), np.argsort(-big, kind="stable"))


def test_l2_beats_l1_on_classic_instance():
    # three items of 6 with capacity 10 need three bins although they sum to 18 < 2·10
    sizes = np.array([6, 6, 6])
    assert P.bin_packing_lower_bound(sizes, 10) == 3
    assert P.first_fit_decreasing(sizes, 10).num_bins == 3


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 12))
def test_ffd_groups_equal_ffd_per_group(seed, num_groups):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    caps = rng.integers(50, 400, size=num_groups)
    group = rng.integers(-1, num_groups, size=n)
    sizes = rng.integers(1, 50, size=n)
    packed = group >= 0
    sizes[packed] = rng.integers(1, caps[group[packed]] + 1)  # every packed item fits its group
    bin_of, num_bins = P.binpack.first_fit_decreasing_groups(sizes, group, caps)
    assert np.all(bin_of[~packed] == -1)
    for g in range(num_groups):
        idx = np.flatnonzero(group == g)
        if idx.size == 0:
            assert num_bins[g] == 0
            continue
        ref = P.first_fit_decreasing(sizes[idx], int(caps[g]))
        np.testing.assert_array_equal(bin_of[idx], ref.bin_of)
        assert num_bins[g] == ref.num_bins


def test_ffd_groups_rejects_bad_input():
    import pytest

    ffd = P.binpack.first_fit_decreasing_groups
    with pytest.raises(ValueError, match="above its group's capacity 5"):
        ffd(np.array([3, 6]), np.array([0, 1]), np.array([10, 5]))
    with pytest.raises(ValueError, match="groups run from 0 to 1"):
        ffd(np.array([3, 6]), np.array([0, 2]), np.array([10, 5]))
    with pytest.raises(ValueError, match="one per item"):
        ffd(np.array([3, 6]), np.array([0]), np.array([10, 5]))
    with pytest.raises(ValueError, match=">= 1 token"):
        ffd(np.array([0, 6]), np.array([0, 1]), np.array([10, 10]))
    with pytest.raises(ValueError, match="at least 1 token"):
        ffd(np.array([3, 6]), np.array([0, -1]), np.array([0, 10]))
