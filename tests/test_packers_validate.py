"""Bad input raises ValueError naming the index, the value and the limit; nothing is dropped."""

import numpy as np
import pytest

import packers as P


@pytest.mark.parametrize(
    "sizes, capacity, match",
    [
        ([3, 0, 2], 8, r"sizes\[1\] = 0 tokens"),
        ([3, -4, 2], 8, r"sizes\[1\] = -4 tokens"),
        ([3.0, np.nan], 8, r"sizes\[1\] = nan"),
        ([3.0, np.inf], 8, r"sizes\[1\] = inf"),
        ([3.0, 2.5], 8, r"sizes\[1\] = 2.5 is not a whole number"),
        ([], 8, r"sizes is empty"),
        ([[1, 2]], 8, r"1-D array"),
        ([3, 9, 2], 8, r"item 1 has 9 tokens, above the capacity 8"),
        ([3, 2], 0, r"capacity=0 tokens"),
    ],
)
@pytest.mark.parametrize("fn", [P.first_fit_decreasing, P.best_fit_decreasing, P.next_fit])
def test_binpack_rejects(fn, sizes, capacity, match):
    with pytest.raises(ValueError, match=match):
        fn(np.asarray(sizes), capacity)


def test_bin_packing_bound_rejects():
    with pytest.raises(ValueError, match=r"item 2 has 11 tokens, above the capacity 10"):
        P.bin_packing_lower_bound(np.array([1, 2, 11]), 10)


def test_makespan_rejects_bad_times_and_shapes():
    bt = np.array([0, 1])
    with pytest.raises(ValueError, match=r"times\[1, 0\] = nan"):
        P.lpt_makespan(np.array([[1.0, 2.0], [np.nan, 1.0]]), bt)
    with pytest.raises(ValueError, match=r"times\[0, 1\] = -1.0"):
        P.lpt_makespan(np.array([[1.0, -1.0]]), bt)
    with pytest.raises(ValueError, match=r"times has no rows"):
        P.lpt_makespan(np.zeros((0, 2)), bt)
    with pytest.raises(ValueError, match=r"bin_type\[1\] = 2 is not a column of times"):
        P.lpt_makespan(np.ones((3, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match=r"bin_type is empty"):
        P.lpt_makespan(np.ones((3, 2)), np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match=r"speed\[1\] = 0.0"):
        P.lpt_makespan(np.ones((3, 2)), bt, speed=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"speed must have one entry per bin \(2\)"):
        P.lpt_makespan(np.ones((3, 2)), bt, speed=np.array([1.0]))
    with pytest.raises(ValueError, match=r"pp_weight\[0\] = -1.0"):
        P.lpt_makespan(np.ones((3, 2)), bt, pp_weight=np.array([-1.0, 0.0]))
    with pytest.raises(ValueError, match=r"sizes has 2 items but times has 3 rows"):
        P.lpt_makespan(np.ones((3, 2)), bt, sizes=np.array([1, 2]), bin_capacity=np.array([4, 4]))
    with pytest.raises(ValueError, match=r"bin_capacity\[1\] = 0 tokens"):
        P.lpt_makespan(np.ones((3, 2)), bt, sizes=np.array([1, 2, 3]), bin_capacity=np.array([4, 0]))
    with pytest.raises(ValueError, match=r"needs sizes"):
        P.lpt_makespan(np.ones((3, 2)), bt, bin_capacity=np.array([4, 4]))


def test_makespan_rejects_items_that_fit_nowhere():
    times = np.array([[1.0, np.inf], [np.inf, np.inf], [2.0, 3.0]])
    with pytest.raises(ValueError, match=r"item 1 has time inf on every bin type present"):
        P.lpt_makespan(times, np.array([0, 1]))
    # a type that has no bin does not make an item eligible
    with pytest.raises(ValueError, match=r"item 0 has time inf on every bin type present \(types \[1\]\)"):
        P.makespan_lower_bound(np.array([[1.0, np.inf]]), np.array([1, 1]))
    sizes = np.array([4, 40, 4])
    with pytest.raises(ValueError, match=r"item 1 has 40 tokens, above the capacity of every bin it is eligible for \(largest: 32 tokens"):
        P.lpt_makespan(np.ones((3, 1)), np.array([0, 0]), sizes=sizes, bin_capacity=np.array([32, 16]))


def test_makespan_loads_rejects_bad_assignment():
    with pytest.raises(ValueError, match=r"bin_of\[2\] = 5 is not a bin index \(there are 2 bins"):
        P.makespan_loads(np.ones((3, 1)), np.array([0, 0]), np.array([0, 1, 5]))


def test_minmax_rejects():
    t = np.array([1.0, 2.0, 3.0])
    s = np.array([2, 3, 4])
    with pytest.raises(ValueError, match=r"item 2 has 4 tokens, above the capacity 3"):
        P.minmax_pack(t, s, 3, 3)
    with pytest.raises(ValueError, match=r"9 tokens cannot fit in 2 bins of 4 tokens"):
        P.minmax_pack(t, s, 2, 4)
    with pytest.raises(ValueError, match=r"num_bins=0; need at least 1 bin"):
        P.minmax_pack(t, s, 0, 10)
    with pytest.raises(ValueError, match=r"times\[1\] = inf"):
        P.minmax_pack(np.array([1.0, np.inf]), np.array([1, 1]), 2, 4)
    with pytest.raises(ValueError, match=r"sizes has 2 items but times has 3"):
        P.minmax_pack(t, s[:2], 2, 10)
    with pytest.raises(ValueError, match=r"9 tokens cannot fit in 2 bins of 4 tokens"):
        P.minmax_pack_lower_bound(t, s, 2, 4)


def test_partition_rejects():
    with pytest.raises(ValueError, match=r"values\[1\] = -1.0"):
        P.karmarkar_karp(np.array([1.0, -1.0]), 2)
    with pytest.raises(ValueError, match=r"values is empty"):
        P.karmarkar_karp(np.array([]), 2)
    with pytest.raises(ValueError, match=r"k=0; need at least 1 bin"):
        P.karmarkar_karp(np.array([1.0]), 0)


def test_cpsat_rejects_bad_hint():
    times = np.array([[1.0, np.inf], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"hint\[0\] = 1: item 0 .* may not run on bin 1"):
        P.cpsat_makespan(times, np.array([0, 1]), hint=np.array([1, 0]))
    with pytest.raises(ValueError, match=r"hint\[1\] = 3 is not a bin index"):
        P.cpsat_makespan(times, np.array([0, 1]), hint=np.array([0, 3]))
    with pytest.raises(ValueError, match=r"the hint puts 5 tokens on bin 0, above its capacity 4"):
        P.cpsat_minmax_pack(np.array([1.0, 1.0]), np.array([2, 3]), 2, 4, hint=np.array([0, 0]))
