"""Heterogeneous LPT + local search: feasibility invariants, repair, bounds, loads."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

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


@settings(max_examples=40, deadline=None)
@given(makespan_instances(max_items=60, max_bins=10))
def test_precomputed_lp_gives_the_same_assignment(inst):
    from packers._lp import type_lp

    times, bin_type, kw = inst
    plain = P.lpt_makespan(times, bin_type, **kw)
    inst_ = makespan_instance(times, bin_type, speed=kw.get("speed"), pp_weight=kw.get("pp_weight"))
    value, x, _ = type_lp(inst_.times, inst_.bin_type, inst_.speed)
    reused = P.lpt_makespan(times, bin_type, lp=(value, x), **kw)
    np.testing.assert_array_equal(plain.bin_of, reused.bin_of)
    assert plain.bound == reused.bound


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_type_lp_weights_equal_repeated_rows(seed, num_types):
    from packers._lp import type_lp

    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 30)
    m = int(rng.integers(num_types, 8))
    bin_type = np.concatenate([np.arange(num_types), rng.integers(0, num_types, size=m - num_types)]).astype(np.int64)
    speed = rng.uniform(0.5, 1.5, size=m)
    times = rng.uniform(0.1, 2.0, size=(rows, num_types))
    times[rng.random((rows, num_types)) < 0.2] = np.inf
    times[:, 0] = np.where(np.isfinite(times).any(axis=1), times[:, 0], 1.0)
    counts = rng.integers(1, 5, size=rows)
    expanded = np.repeat(times, counts, axis=0)
    v_rep, _, _ = type_lp(expanded, bin_type, speed)
    v_w, x_w, _ = type_lp(times, bin_type, speed, weights=counts)
    assert abs(v_rep - v_w) <= 1e-5 * max(v_rep, 1e-12)
    np.testing.assert_allclose(x_w.sum(axis=1), 1.0)
    # unit weights are the plain LP, bit for bit
    v1, x1, _ = type_lp(times, bin_type, speed, weights=np.ones(rows))
    v0, x0, _ = type_lp(times, bin_type, speed)
    assert v1 == v0 and np.array_equal(x1, x0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 300), st.integers(1, 60))
def test_descending_order_is_stable_lexsort(seed, n, levels):
    from packers._greedy import descending_order

    rng = np.random.default_rng(seed)
    x = np.round(rng.random(n) * levels) / levels  # many ties
    x[rng.random(n) < 0.1] = np.inf
    np.testing.assert_array_equal(descending_order(x), np.lexsort((np.arange(n), -x)))


_INF = np.inf
_MIN_GAIN = 1e-4


@njit(cache=True)
def _plain_swap_scan(b, partners, num_partners, first, times, bin_type, speed, pp_weight, sizes, bin_capacity, head, nxt, fs, ist, g_id, g_tb, g_tj):
    """Every pair scanned in list order (the definition ``_best_swap`` must match)."""
    lb = fs[3, b]
    best = lb * (1.0 - _MIN_GAIN)
    bi = -1
    bk = -1
    kb = bin_type[b]
    for q in range(num_partners):
        j = partners[q]
        if j == b:
            continue
        kj = bin_type[j]
        # gather the partner's items: id, time on b's type, time on its own type
        cnt = 0
        i2 = head[j]
        while i2 >= 0:
            g_id[cnt] = i2
            g_tb[cnt] = times[i2, kb]
            g_tj[cnt] = times[i2, kj]
            cnt += 1
            i2 = nxt[i2]
        rest_j1 = fs[1, j]
        rest_j2 = fs[2, j]
        i = head[b]
        while i >= 0:
            tb = times[i, kb]
            tij = times[i, kj]
            if tij != _INF:
                rest_b = fs[2, b] if tb == fs[1, b] else fs[1, b]
                sum_b = fs[0, b] - tb
                for r in range(cnt):
                    t2b = g_tb[r]
                    if t2b < tb:  # the swap must shrink bin b's sum (necessary for any gain on b)
                        nb = (sum_b + t2b + pp_weight[b] * max(rest_b, t2b)) / speed[b]
                        if nb < best:
                            t2j = g_tj[r]
                            rest_j = rest_j2 if t2j == rest_j1 else rest_j1
                            nj = (fs[0, j] - t2j + tij + pp_weight[j] * max(rest_j, tij)) / speed[j]
                            if nj < best:
                                i2 = g_id[r]
                                if ist[0, b] - sizes[i] + sizes[i2] <= bin_capacity[b] and ist[0, j] - sizes[i2] + sizes[i] <= bin_capacity[j]:
                                    best = max(nb, nj)
                                    bi = i
                                    bk = i2
            i = nxt[i]
        if first and bi >= 0:
            break
    return bi, bk, best



@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**31 - 1), st.booleans(), st.booleans(), st.booleans())
def test_windowed_swap_equals_plain_scan(seed, same_type, pipeline, duplicates):
    """The windowed swap search returns exactly the pair the full pair scan returns."""
    from packers._moves import _best_swap
    from packers._state import _new_state, build_instance, cls_args

    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 120))
    m = int(rng.integers(2, 9))
    num_types = 1 if same_type else 2
    bin_type = rng.integers(0, num_types, size=m).astype(np.int64)
    bin_type[0] = 0  # type 0 (every item eligible) is present
    lengths = rng.integers(1, 20 if duplicates else 4000, size=n)
    a = rng.uniform(1e-8, 1e-6, size=num_types)
    times = np.ascontiguousarray(a[None, :] * lengths[:, None] ** 2 + 1e-4 * lengths[:, None], dtype=np.float64)
    if rng.random() < 0.3:  # times that do not grow together across types
        times = np.round(rng.uniform(0.1, 2.0, size=(n, num_types)), 1 if duplicates else 6)
    if num_types == 2 and rng.random() < 0.5:
        times[rng.random(n) < 0.2, 1] = np.inf
    speed = rng.uniform(0.5, 1.5, size=m) if rng.random() < 0.5 else np.ones(m)
    pp_weight = rng.integers(0, 3, size=m).astype(np.float64) if pipeline else np.zeros(m)
    sizes = lengths.astype(np.int64)
    cap = np.full(m, int(sizes.sum()) if rng.random() < 0.5 else int(sizes.sum() // m + sizes.max()), dtype=np.int64)
    bin_of = rng.integers(0, m, size=n).astype(np.int64)
    ok = np.isfinite(times[np.arange(n), bin_type[bin_of]])
    bin_of[~ok] = 0
    inst = build_instance(times, bin_type, speed, pp_weight, sizes, cap)
    args = cls_args(inst)
    head, nxt, prv, fs, ist, tval, tidx = _new_state(
        times, bin_type, speed, pp_weight, sizes, bin_of, inst.cls_of, inst.cls_pos, inst.cls_off, inst.cls_leaves, args[-1]
    )
    b = int(np.argmax(fs[3]))
    partners = np.array([j for j in np.argsort(fs[3], kind="stable") if j != b], dtype=np.int64)
    for first in (False, True):
        g = [np.empty(n, dtype=np.int64), np.empty(n), np.empty(n)]
        got = _best_swap(b, partners, partners.size, first, times, bin_type, speed, pp_weight, sizes, cap, head, nxt, fs, ist, *g)
        g = [np.empty(n, dtype=np.int64), np.empty(n), np.empty(n)]
        want = _plain_swap_scan(b, partners, partners.size, first, times, bin_type, speed, pp_weight, sizes, cap, head, nxt, fs, ist, *g)
        assert got[0] == want[0] and got[1] == want[1] and got[2] == want[2]
