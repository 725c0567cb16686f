"""balancer.dispatch: replica tables, stage-1 times, greedy dispatch and the lower bound."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.cost import CostModel, LayoutCost
from balancer.dispatch import (
    ReplicaTable,
    dispatch,
    item_seconds,
    lower_bound,
    quick_lower_bound,
    stage1_arrays,
    stage1_lp,
    stage1_times,
)
from balancer.microbatch import pack_micro_batches
from strategies import Layout, Strategy

MODEL = CostModel.from_coefficients(
    {
        Layout(1): LayoutCost(a=2e-7, b=2e-4, c=0.01, token_capacity=1000),
        Layout(2): LayoutCost(a=1.1e-7, b=1.1e-4, c=0.012, token_capacity=2000),
        Layout(1, pp=2): LayoutCost(a=1.05e-7, b=1.05e-4, c=0.006, token_capacity=2000),
    }
)


def _strategy(*counts: tuple[Layout, int]) -> Strategy:
    return Strategy.from_counts(list(counts))


def test_table_groups_types_and_takes_slowest_rank():
    strat = _strategy((Layout(2), 1), (Layout(1), 2))
    table = ReplicaTable.build(strat, MODEL, [1.0, 0.5, 1.0, 0.8])
    assert table.layouts == (Layout(2), Layout(1))
    assert table.bin_type.tolist() == [0, 1, 1]
    assert table.speed.tolist() == [0.5, 1.0, 0.8]
    assert table.capacity.tolist() == [2000, 1000] and table.max_capacity == 2000
    assert table.pp_weight.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="4 ranks but 3 speeds"):
        ReplicaTable.build(strat, MODEL, [1.0, 1.0, 1.0])


def test_stage1_times_anticipate_overhead_and_mark_ineligible():
    table = ReplicaTable.build(_strategy((Layout(2), 1), (Layout(1), 2)), MODEL)
    lengths = np.array([500, 1500], dtype=np.int64)
    t = item_seconds(table, lengths)
    w = stage1_times(table, lengths, t)
    assert w[0, 0] == pytest.approx(1.1e-7 * 500**2 + 1.1e-4 * 500 + 0.012 * 500 / 2000)
    assert w[0, 1] == pytest.approx(2e-7 * 500**2 + 2e-4 * 500 + 0.01 * 500 / 1000)
    assert np.isinf(w[1, 1]) and np.isfinite(w[1, 0])


def test_dispatch_rejects_overlong():
    table = ReplicaTable.build(_strategy((Layout(1), 2)), MODEL)
    with pytest.raises(ValueError, match="batch position 1 has 1500 tokens, above the largest capacity 1000"):
        dispatch(table, np.array([10, 1500], dtype=np.int64))


STRATS = [
    _strategy((Layout(1), 4)),
    _strategy((Layout(2), 1), (Layout(1), 2)),
    _strategy((Layout(1, pp=2), 1), (Layout(1), 2)),
    _strategy((Layout(2), 2)),
    _strategy((Layout(1, pp=2), 2)),
]


@settings(max_examples=60, deadline=None)
@given(
    which=st.integers(0, len(STRATS) - 1),
    n=st.integers(1, 60),
    seed=st.integers(0, 10_000),
    slow=st.sampled_from([1.0, 0.5]),
)
def test_dispatch_invariants_and_bound(which, n, seed, slow):
    strat = STRATS[which]
    speeds = [1.0] * strat.num_ranks
    speeds[-1] = slow
    table = ReplicaTable.build(strat, MODEL, speeds)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, table.max_capacity + 1, size=n).astype(np.int64)
    d = dispatch(table, lengths)
    m = table.num_replicas
    assert d.bin_of.shape == (n,) and d.bin_of.min() >= 0 and d.bin_of.max() < m
    assert np.all(lengths <= table.capacity[table.bin_type[d.bin_of]])
    eligible_everywhere = bool(np.all(lengths <= table.capacity.min()))
    if n >= m and eligible_everywhere:
        assert np.bincount(d.bin_of, minlength=m).min() >= 1
    t = item_seconds(table, lengths)
    t_item = t[np.arange(n), table.bin_type[d.bin_of]]
    est = pack_micro_batches(table, d.bin_of, lengths, t_item).step_seconds
    bound = lower_bound(table, lengths, t)
    assert 0 < bound <= est * (1 + 1e-9)


def _exact_replica(sizes, times, cap, c, pp, speed):
    """Exact best stage 2 of one replica by enumeration (tiny sets only)."""
    n = len(sizes)
    if n == 0:
        return 0.0
    best = np.inf
    for v in range(pp, max(pp, n) + 1):
        for labels in itertools.product(range(v), repeat=n):
            lab = np.array(labels)
            if np.bincount(lab, weights=sizes, minlength=v).max() > cap:
                continue
            tt = np.bincount(lab, weights=times, minlength=v)
            best = min(best, (tt.sum() + v * c + (pp - 1) * tt.max()) / speed)
    return best


@settings(max_examples=25, deadline=None)
@given(
    which=st.integers(0, len(STRATS) - 1),
    lengths=st.lists(st.integers(1, 2000), min_size=1, max_size=4),
)
def test_bound_below_exact_optimum(which, lengths):
    """The bound is valid against the true optimum of both stages, not only against the heuristic."""
    table = ReplicaTable.build(STRATS[which], MODEL, [1.0] * (STRATS[which].num_ranks - 1) + [0.7])
    s = np.array(lengths, dtype=np.int64)
    if s.max() > table.max_capacity:
        return
    t = item_seconds(table, s)
    m = table.num_replicas
    best = np.inf
    for assign in itertools.product(range(m), repeat=s.size):
        a = np.array(assign)
        if np.any(s > table.capacity[table.bin_type[a]]):
            continue
        worst = 0.0
        for j in range(m):
            k = table.bin_type[j]
            idx = np.flatnonzero(a == j)
            worst = max(
                worst,
                _exact_replica(s[idx], t[idx, k], table.capacity[k], table.c[k], int(table.pp[k]), table.speed[j]),
            )
        best = min(best, worst)
    assert lower_bound(table, s, t) <= best * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(which=st.integers(0, len(STRATS) - 1), n=st.integers(1, 80), seed=st.integers(0, 10_000))
def test_stage1_arrays_bitwise_and_bounds_from_distinct_lengths(which, n, seed):
    strat = STRATS[which]
    table = ReplicaTable.build(strat, MODEL, [1.0] * (strat.num_ranks - 1) + [0.6])
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, table.max_capacity + 1, size=n).astype(np.int64)
    lengths[: n // 2] = lengths[n // 2 :][: n // 2]  # duplicates: distinct rows carry counts
    t, w = stage1_arrays(table, lengths)
    assert np.array_equal(t, item_seconds(table, lengths))
    assert np.array_equal(w, stage1_times(table, lengths))
    full = stage1_lp(table, w)
    distinct, counts = np.unique(lengths, return_counts=True)
    t_d, w_d = stage1_arrays(table, distinct)
    agg = stage1_lp(table, w_d, counts)
    assert abs(agg.value - full.value) <= 1e-5 * full.value
    quick = quick_lower_bound(table, distinct, t_d, agg, counts)
    bound = lower_bound(table, lengths, t, w=w, lp=agg)
    assert quick <= bound * (1 + 1e-9)
    d = dispatch(table, lengths, w, lp=full)
    assert np.array_equal(d.bin_of, dispatch(table, lengths).bin_of)  # the reused LP changes nothing
    t_item = t[np.arange(n), table.bin_type[d.bin_of]]
    assert bound <= pack_micro_batches(table, d.bin_of, lengths, t_item).step_seconds * (1 + 1e-9)
