"""balancer.stage1: replica tables, stage-1 times, greedy dispatch and the lower bound."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.bounds import _dual_approximation_bound, _replica_capacity, lower_bound, quick_lower_bound
from balancer.cost import CostModel, LayoutCost
from balancer.microbatch import pack_micro_batches
from balancer.stage1 import (
    ReplicaTable,
    dispatch,
    item_seconds,
    stage1_arrays,
    stage1_lp,
    stage1_times,
)
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


def _set_partitions(items: list[int]):
    """Every partition of ``items`` into non-empty blocks."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[first]] + part
        for b in range(len(part)):
            yield part[:b] + [[first] + part[b]] + part[b + 1 :]


def _exact_replica_partitions(sizes, times, cap, c, pp, speed):
    """Exact best stage 2 of one replica: the micro-batches are a partition of its items
    (plus empty ones up to ``pp``; more empty ones only add ``c``)."""
    if len(sizes) == 0:
        return 0.0
    best = np.inf
    for part in _set_partitions(list(range(len(sizes)))):
        if any(sum(sizes[i] for i in block) > cap for block in part):
            continue
        tt = [sum(times[i] for i in block) for block in part]
        best = min(best, (sum(tt) + max(pp, len(part)) * c + (pp - 1) * max(tt)) / speed)
    return best


def _exact_optimum(table, s, t):
    """Optimum of both stages by enumeration (tiny instances): every assignment, every micro-batching."""
    m, n = table.num_replicas, s.size
    cache: dict[tuple[int, int], float] = {}
    best = np.inf
    for assign in itertools.product(range(m), repeat=n):
        a = np.array(assign)
        if np.any(s > table.capacity[table.bin_type[a]]):
            continue
        worst = 0.0
        for j in range(m):
            mask = int(sum(1 << i for i in range(n) if a[i] == j))
            if (j, mask) not in cache:
                k = table.bin_type[j]
                idx = np.flatnonzero(a == j)
                cache[(j, mask)] = _exact_replica_partitions(
                    s[idx].tolist(), t[idx, k].tolist(), int(table.capacity[k]), float(table.c[k]), int(table.pp[k]),
                    float(table.speed[j]),
                )
            worst = max(worst, cache[(j, mask)])
            if worst >= best:
                break
        best = min(best, worst)
    return best


# micro-batch overhead c large next to the item times and small capacities, so that whole
# micro-batches, pipeline bubbles and lumpy items all matter on tiny instances
LUMPY = CostModel.from_coefficients(
    {
        Layout(1): LayoutCost(a=4e-7, b=2e-4, c=0.05, token_capacity=300),
        Layout(2): LayoutCost(a=1.5e-7, b=1.2e-4, c=0.06, token_capacity=600),
        Layout(1, pp=2): LayoutCost(a=2.2e-7, b=1.1e-4, c=0.03, token_capacity=400),
        Layout(1, pp=3): LayoutCost(a=1.6e-7, b=0.8e-4, c=0.02, token_capacity=500),
    }
)
LUMPY_STRATS = [
    _strategy((Layout(1), 3)),
    _strategy((Layout(2), 1), (Layout(1), 2)),
    _strategy((Layout(1, pp=2), 1), (Layout(1), 2)),
    _strategy((Layout(1, pp=3), 1), (Layout(2), 1)),
    _strategy((Layout(1, pp=2), 2)),
    _strategy((Layout(1, pp=3), 1), (Layout(1, pp=2), 1), (Layout(1), 1)),
]


@settings(max_examples=60, deadline=None)
@given(
    which=st.integers(0, len(LUMPY_STRATS) - 1),
    lengths=st.lists(st.integers(1, 600), min_size=1, max_size=5),
    slow=st.sampled_from([1.0, 0.6]),
)
def test_every_bound_below_exact_two_stage_optimum(which, lengths, slow):
    """lower_bound (bound 6 included, and on its own from a weak start) never exceeds the
    exact optimum of both stages, with pipelines, mixed layouts and a straggler."""
    strat = LUMPY_STRATS[which]
    table = ReplicaTable.build(strat, LUMPY, [1.0] * (strat.num_ranks - 1) + [slow])
    s = np.array(lengths, dtype=np.int64)
    if s.max() > table.max_capacity:
        return
    t = item_seconds(table, s)
    best = _exact_optimum(table, s, t)
    assert lower_bound(table, s, t) <= best * (1 + 1e-9)
    start = 1e-3 * best  # bound 6 searches upward from any valid start
    assert _dual_approximation_bound(table, s, start) <= best * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(
    y=st.floats(0.0, 5.0),
    c=st.sampled_from([0.0, 0.01, 0.07, 0.3]),
    b=st.sampled_from([0.0, 1e-4, 3e-4]),
    cap=st.integers(50, 3000),
    theta=st.sampled_from([0.0, 0.5, 3.0]),
    pp=st.sampled_from([1, 2, 4]),
)
def test_replica_capacity_is_the_max_over_micro_batch_counts(y, c, b, cap, theta, pp):
    """The binary search of γ(y) finds max(0, max_{pp ≤ v ≤ y/c} α·min(v·cap, W_v/b) + W_v),
    ``W_v = (y − v·c)·v/(v + pp − 1)``, found here by enumeration."""
    strat = _strategy((Layout(1, pp=pp), 1))
    model = CostModel.from_coefficients({Layout(1, pp=pp): LayoutCost(a=0.0, b=b, c=c, token_capacity=cap)})
    table = ReplicaTable.build(strat, model)
    alpha = np.array([c / cap + theta * b])
    got = float(_replica_capacity(table, np.array([y]), alpha)[0])
    if c == 0.0:
        want = np.inf if b == 0.0 else y + alpha[0] * y / b
    else:
        v = np.arange(pp, int(np.floor(y / c)) + 1, dtype=np.float64)
        work = (y - c * v) * v / (v + pp - 1)
        tokens = np.minimum(v * cap, work / b) if b > 0 else v * cap
        want = max(0.0, float((alpha[0] * tokens + work).max())) if v.size else 0.0
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_dual_approximation_sees_lumpy_items_and_whole_micro_batches():
    """Two long sequences and one fast replica: the LP by type spreads the second over the
    slow replicas; bound 6 knows it cannot, and lands within a few percent of the optimum."""
    strat = _strategy((Layout(2), 1), (Layout(1), 3))
    table = ReplicaTable.build(strat, LUMPY)
    s = np.array([292, 275, 198, 186, 156], dtype=np.int64)
    t = item_seconds(table, s)
    best = _exact_optimum(table, s, t)
    lp = stage1_lp(table, stage1_times(table, s, t)).value
    bound = lower_bound(table, s, t)
    assert lp < 0.8 * best
    assert 0.97 * best <= bound <= best * (1 + 1e-9)


def test_dual_approximation_sees_the_bubble_of_mixed_pipelines():
    """Pipeline and non-pipeline replicas together, many short sequences: bound 6 charges
    the bubble the stage-1 LP ignores, and stays below the greedy plan."""
    strat = _strategy((Layout(1, pp=2), 4), (Layout(2), 2))
    table = ReplicaTable.build(strat, LUMPY)
    rng = np.random.default_rng(3)
    s = rng.integers(20, 300, size=300).astype(np.int64)
    t, w = stage1_arrays(table, s)
    lp = stage1_lp(table, w)
    bound = lower_bound(table, s, t, w=w, lp=lp)
    d = dispatch(table, s, w, lp=lp)
    est = pack_micro_batches(table, d.bin_of, s, t[np.arange(s.size), table.bin_type[d.bin_of]]).step_seconds
    assert bound > 1.01 * lp.value
    assert bound <= est * (1 + 1e-9)
    assert lower_bound(table, s, t, w=w, lp=lp) == bound  # deterministic


# The same lumpy layouts with a per-sequence overhead d of the order of a short item's time
LUMPY_D = CostModel.from_coefficients(
    {lay: LayoutCost(a=c.a, b=c.b, c=c.c, d=d, token_capacity=c.token_capacity)
     for (lay, c), d in zip(((lay, LUMPY.cost(lay)) for lay in LUMPY.layouts), (0.02, 0.035, 0.01, 0.015))}
)


@settings(max_examples=60, deadline=None)
@given(
    which=st.integers(0, len(LUMPY_STRATS) - 1),
    lengths=st.lists(st.integers(1, 600), min_size=1, max_size=5),
    slow=st.sampled_from([1.0, 0.6]),
)
def test_bounds_stay_below_the_exact_optimum_with_a_per_sequence_term(which, lengths, slow):
    """With d > 0 the item times carry d (checked against the formula written out), and every
    bound — the planner's and the baselines' — stays below the exact two-stage optimum,
    enumerated over every assignment and micro-batching, and below the greedy plan."""
    from balancer.baselines import strategy_lower_bound
    from strategies.layout import ClusterSpec

    strat = LUMPY_STRATS[which]
    speeds = [1.0] * (strat.num_ranks - 1) + [slow]
    table = ReplicaTable.build(strat, LUMPY_D, speeds)
    s = np.array(lengths, dtype=np.int64)
    if s.max() > table.max_capacity:
        return
    costs = [LUMPY_D.cost(lay) for lay in table.layouts]
    t = np.array([[k.a * x * x + k.b * x + k.d for k in costs] for x in s.astype(float)])
    assert np.allclose(item_seconds(table, s), t, rtol=1e-12)
    best = _exact_optimum(table, s, t)
    w = stage1_times(table, s, t)
    lp = stage1_lp(table, w)
    assert lower_bound(table, s, t, w=w, lp=lp) <= best * (1 + 1e-9)
    assert quick_lower_bound(table, s, t, lp) <= best * (1 + 1e-9)
    cluster = ClusterSpec(num_ranks=strat.num_ranks, ranks_per_node=strat.num_ranks, speed=tuple(speeds))
    assert strategy_lower_bound(s, strat, LUMPY_D, cluster) <= best * (1 + 1e-9)
    d = dispatch(table, s, w, lp=lp)
    est = pack_micro_batches(table, d.bin_of, s, t[np.arange(s.size), table.bin_type[d.bin_of]]).step_seconds
    assert best <= est * (1 + 1e-9)
