"""balancer.lockstep: free vs lockstep step times, and the longest-first order that minimises the latter."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.cost import CostModel, LayoutCost
from balancer.lockstep import free_step_seconds, lockstep_price, lockstep_step_seconds, longest_first
from balancer.selector import Balancer
from strategies import ClusterSpec, Layout, Strategy

times = st.lists(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=4), min_size=1, max_size=3)


def test_longest_first_is_stable() -> None:
    assert longest_first([1, 3, 2, 3]) == [1, 3, 2, 0]
    assert longest_first([]) == []


def test_step_times_by_hand() -> None:
    t = [[3.0, 1.0], [2.0]]
    assert free_step_seconds(t) == 4.0
    assert lockstep_step_seconds(t, 0.5) == 3.0 + 1.0  # slot 1: max(1.0, pad 0.5)
    assert lockstep_step_seconds([[1.0, 3.0], [2.0]], 0.5) == 2.0 + 3.0
    with pytest.raises(ValueError, match="pad_seconds"):
        lockstep_step_seconds(t, -1.0)


@settings(max_examples=150, deadline=None)
@given(times, st.floats(0.0, 1.0))
def test_lockstep_is_never_faster_than_free_and_longest_first_is_optimal(t: list[list[float]], share: float) -> None:
    pad = share * min(min(r) for r in t)  # a one-token pad is never slower than a real micro-batch
    sort = [[r[i] for i in longest_first(r)] for r in t]
    best = lockstep_step_seconds(sort, pad)
    # every rank waits for the slowest at each micro-batch: never faster than running free
    # (up to the pads a rank with fewer micro-batches runs)
    assert best >= free_step_seconds(t) - 1e-9
    # longest first on every rank is the best of all orders (brute force over the small cases)
    every = min(lockstep_step_seconds(list(p), pad) for p in itertools.product(*(itertools.permutations(r) for r in t)))
    assert best == pytest.approx(every, rel=1e-12, abs=1e-12)


def test_lockstep_price_of_a_balancer_plan() -> None:
    cost = CostModel.from_coefficients({Layout(1): LayoutCost(a=4e-9, b=2e-5, c=2e-3, token_capacity=2048)})
    balancer = Balancer(ClusterSpec(num_ranks=4), [Strategy.homogeneous(Layout(1), 4)], cost)
    lengths = np.random.default_rng(0).integers(10, 2000, size=60)
    plan = balancer.plan(lengths, step=0)
    price = lockstep_price(plan, lengths, cost)
    counts = [len(r.micro_batches) for r in plan.replicas]
    assert price.micro_batches == max(counts) and price.pads == sum(max(counts) - c for c in counts)
    assert price.free == pytest.approx(plan.est_step_seconds, rel=1e-9)  # the planner's own estimate
    assert price.lockstep["seconds"] <= min(price.lockstep["plan"], price.lockstep["tokens"]) + 1e-12
    assert price.lockstep["seconds"] >= price.free - 1e-12
