"""BalancedBatchSampler: coverage, determinism, over-long policies, drop_last and resumption."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.cost import CostModel
from balancer.selector import Balancer, BalancerConfig
from dataloader.sampler import BalancedBatchSampler, SamplerConfig
from strategies.layout import ClusterSpec, Layout, Strategy

CAP = 64
"""Token capacity of a tp1 micro-batch in these tests (tp2 holds twice as many)."""


def config(**kw: Any) -> SamplerConfig:
    """Ranks simulated in one process have no torch.distributed to exchange plans over: ``plan_sync='none'``."""
    return SamplerConfig(plan_sync="none", **kw)


def make_balancer(world: int, *, hetero: bool = True, cap: int = CAP, switch_penalty: float = 0.0) -> Balancer:
    cost = CostModel.from_coefficients({"tp1": (1e-6, 1e-4, 1e-3, cap), "tp2": (0.6e-6, 0.6e-4, 1e-3, 2 * cap)})
    cands = [Strategy.homogeneous(Layout(tp=1), world)]
    if world % 2 == 0:
        cands.append(Strategy.homogeneous(Layout(tp=2), world))
    if hetero and world >= 3:
        cands.append(Strategy.from_counts([(Layout(tp=2), 1), (Layout(tp=1), world - 2)]))
    return Balancer(ClusterSpec(num_ranks=world), cands, cost, BalancerConfig(switch_penalty=switch_penalty))


def samplers(lengths, world, config, **kw):  # type: ignore[no-untyped-def]
    """One sampler per rank, as the ranks of a job would build them (in one process)."""
    return [BalancedBatchSampler(lengths, make_balancer(world, **kw), config, rank=r, world_size=world) for r in range(world)]


def run_epoch(group):  # type: ignore[no-untyped-def]
    """Per step: the plan digest and the pieces each replica ran (tp peers share a replica)."""
    per_rank = [list(s) for s in group]
    steps = []
    for t in range(len(per_rank[0])):
        rows = [per_rank[r][t] for r in range(len(group))]
        assert len({row.plan.digest for row in rows}) == 1, f"ranks disagree on step {t}"
        replicas: dict[int, list[tuple[int, int, int]]] = {}
        for row in rows:
            pieces = [(sid, a, b) for mb in row.micro_batches for sid, a, b in zip(mb.sample_ids, mb.starts, mb.ends)]
            prev = replicas.setdefault(row.rank_plan.replica_index, pieces)
            assert prev == pieces, "ranks of one replica got different micro-batches"
        steps.append(sorted(p for ps in replicas.values() for p in ps))
    return steps


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 3 * CAP), min_size=1, max_size=60),
    world=st.integers(1, 4),
    tokens=st.one_of(st.none(), st.integers(1, 600)),
    sequences=st.integers(1, 12),
    policy=st.sampled_from(["split", "truncate", "drop"]),
    hetero=st.booleans(),
    seed=st.integers(0, 3),
)
def test_every_sample_exactly_once_per_epoch_across_ranks(
    lengths: list[int], world: int, tokens: int | None, sequences: int, policy: str, hetero: bool, seed: int
) -> None:
    budget = {"tokens_per_step": tokens} if tokens else {"sequences_per_step": sequences}
    cfg = config(**budget, overlong=policy, seed=seed)
    lens = np.asarray(lengths)
    if policy == "drop" and lens.min() > make_balancer(world, hetero=hetero).max_sequence_length:
        with pytest.raises(ValueError, match="nothing to train on"), pytest.warns(UserWarning, match="dropped"):
            samplers(lens, world, cfg, hetero=hetero)  # never an epoch of 0 steps
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = samplers(lens, world, cfg, hetero=hetero)
    steps = run_epoch(group)
    cap = group[0].max_length
    seen = Counter(p for step in steps for p in step)
    assert all(c == 1 for c in seen.values())
    for sid, n in enumerate(lengths):
        pieces = sorted((a, b) for s, a, b in seen if s == sid)
        if policy == "drop" and n > cap:
            assert pieces == []
        elif policy == "truncate" or n <= cap:
            assert pieces == [(0, min(n, cap))]
        else:
            assert pieces[0][0] == 0 and pieces[-1][1] == n, f"sample {sid} not covered"
            assert all(a1 == b0 - 1 for (_, b0), (a1, _) in zip(pieces, pieces[1:])), "pieces overlap by one token"
            assert all(b - a <= cap for a, b in pieces)
    assert group[0].epoch == 1


def test_epochs_reshuffle_and_are_reproducible() -> None:
    lens = np.arange(1, 41)
    cfg = config(sequences_per_step=8, seed=5)
    a = BalancedBatchSampler(lens, make_balancer(2), cfg, rank=0, world_size=2)
    e0 = [x.plan.sample_ids() for x in a]
    e1 = [x.plan.sample_ids() for x in a]
    assert sorted(i for s in e0 for i in s) == list(range(40))
    assert e0 != e1
    b = BalancedBatchSampler(lens, make_balancer(2), config(sequences_per_step=8, seed=5), rank=1, world_size=2)
    assert [x.plan.sample_ids() for x in b] == e0
    ordered = BalancedBatchSampler(lens, make_balancer(1), config(sequences_per_step=8, shuffle=False), world_size=1)
    assert [sorted(x.plan.sample_ids()) for x in ordered][0] == list(range(8))


def test_token_budget_batches_stay_under_budget() -> None:
    rng = np.random.default_rng(0)
    lens = rng.integers(1, CAP, size=200)
    s = BalancedBatchSampler(lens, make_balancer(2), config(tokens_per_step=500), world_size=2)
    for step in s:
        assert step.plan.global_tokens <= 500
        assert step.global_loss_tokens == step.plan.global_loss_tokens == step.plan.global_tokens - step.plan.global_sequences


def test_overlong_error_names_sample_length_and_capacity() -> None:
    lens = np.array([10, 5, 3 * CAP, 7])
    with pytest.raises(ValueError, match=rf"sample 2 has {3 * CAP} tokens, above the largest capacity {2 * CAP}"):
        BalancedBatchSampler(lens, make_balancer(2), config(sequences_per_step=2), world_size=2)


def test_overlong_truncate_drop_split_are_reported() -> None:
    lens = np.array([10, 300, 5, 200])
    bal = make_balancer(2)
    with pytest.warns(UserWarning, match="truncated 2 sample"):
        t = BalancedBatchSampler(lens, bal, config(sequences_per_step=4, overlong="truncate"), world_size=2)
    assert t.stats.truncated == 2 and t.stats.truncated_tokens == (300 - 128) + (200 - 128)
    assert sorted(t.piece(i)[2] for i in range(4)) == [5, 10, 128, 128]
    with pytest.warns(UserWarning, match="dropped 2 sample"):
        d = BalancedBatchSampler(lens, bal, config(sequences_per_step=4, overlong="drop"), world_size=2)
    assert d.stats.dropped_overlong == 2 and d.stats.dropped_overlong_ids == [1, 3]
    assert sorted(i for x in d for i in x.plan.sample_ids()) == [0, 2]
    with pytest.warns(UserWarning, match="split 2 sample"):
        s = BalancedBatchSampler(lens, bal, config(sequences_per_step=4, overlong="split"), world_size=2)
    steps = list(s)
    loss = sum(x.global_loss_tokens for x in steps)
    assert loss == int((lens - 1).sum()), "split keeps every next-token target exactly once"


def test_explicit_max_length_and_its_limit() -> None:
    lens = np.array([10, 60, 5])
    with pytest.warns(UserWarning):
        s = BalancedBatchSampler(lens, make_balancer(1), config(sequences_per_step=3, overlong="truncate", max_length=32), world_size=1)
    assert s.max_length == 32 and s.stats.truncated == 1
    with pytest.raises(ValueError, match="above the balancer's largest capacity"):
        BalancedBatchSampler(lens, make_balancer(1), config(sequences_per_step=3, max_length=10_000), world_size=1)


def test_drop_last_is_counted() -> None:
    lens = np.full(10, 4)
    keep = BalancedBatchSampler(lens, make_balancer(2), config(sequences_per_step=4), world_size=2)
    assert [x.plan.global_sequences for x in keep] == [4, 4, 2]
    drop = BalancedBatchSampler(lens, make_balancer(2), config(sequences_per_step=4, drop_last=True), world_size=2)
    assert [x.plan.global_sequences for x in drop] == [4, 4]
    assert drop.stats.dropped_last_samples == 2
    exact = BalancedBatchSampler(np.full(8, 4), make_balancer(2), config(sequences_per_step=4, drop_last=True), world_size=2)
    assert len(list(exact)) == 2 and exact.stats.dropped_last_samples == 0


def test_a_step_of_more_than_half_an_epoch_is_named() -> None:
    lengths = np.full(40, 50)  # 2,000 tokens per epoch
    with pytest.warns(UserWarning, match=r"tokens_per_step=1,200 is 60% of the 2,000 tokens of an epoch"):
        BalancedBatchSampler(lengths, make_balancer(1), SamplerConfig(tokens_per_step=1200))
    with pytest.warns(UserWarning, match=r"sequences_per_step=25 is more than half of the 40 sequences"):
        BalancedBatchSampler(lengths, make_balancer(1), SamplerConfig(sequences_per_step=25))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BalancedBatchSampler(lengths, make_balancer(1), SamplerConfig(tokens_per_step=1000))  # exactly half: fine


def test_a_micro_batch_beyond_what_the_cost_model_measured_is_named() -> None:
    """A capacity of 4,096 tokens but times measured up to 256: the first bigger micro-batch warns, once."""
    measured = CostModel.fit([64, 128, 192, 256], [1.0, 2.1, 3.3, 4.6], token_capacity=4096)
    assert measured.measured_tokens(Layout()) == 256
    lengths = np.full(200, 100)
    balancer = Balancer(ClusterSpec(num_ranks=1), [Strategy.homogeneous(Layout(), 1)], measured)
    sampler = BalancedBatchSampler(lengths, balancer, SamplerConfig(tokens_per_step=2000))
    with pytest.warns(UserWarning, match=r"holds [\d,]+ tokens, [\d.]+× the largest micro-batch the cost model measured for tp1 \(256 tokens\)") as caught:
        steps = list(sampler)
    assert len(steps) == 10 and sum("the cost model measured" in str(w.message) for w in caught) == 1
    # given coefficients measured nothing: no such warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(BalancedBatchSampler(lengths, make_balancer(1, cap=4096), SamplerConfig(tokens_per_step=2000)))


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="row 1 has 0 tokens"):
        BalancedBatchSampler(np.array([3, 0]), make_balancer(1), config(sequences_per_step=1), world_size=1)
    with pytest.raises(ValueError, match="exactly one of tokens_per_step"):
        SamplerConfig()
    with pytest.raises(ValueError, match="overlong='cut'"):
        SamplerConfig(sequences_per_step=1, overlong="cut")
    with pytest.raises(ValueError, match="plans for 2 ranks but world_size=3"):
        BalancedBatchSampler(np.array([3]), make_balancer(2), config(sequences_per_step=1), world_size=3, rank=0)
    with pytest.raises(ValueError, match="sample 0: loss_tokens=5"):
        BalancedBatchSampler(np.array([3]), make_balancer(1), config(sequences_per_step=1), loss_tokens=[5], world_size=1)


def wait_until_planned_ahead(sampler: BalancedBatchSampler) -> None:
    stream = sampler._stream
    if stream is None:
        return
    deadline = time.monotonic() + 30
    while not stream._out.full() and stream._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)


def _pieces_of(steps):  # type: ignore[no-untyped-def]
    return [[(mb.sample_ids, mb.starts, mb.ends) for mb in s.micro_batches] for s in steps]


@pytest.mark.parametrize("k", [0, 1, 4])
def test_resume_at_step_k_yields_exactly_the_rest(k: int) -> None:
    rng = np.random.default_rng(1)
    lens = rng.integers(1, CAP, size=90)
    lens[rng.random(90) < 0.08] = 100  # a few sequences only tp2 can hold: the best strategy varies

    def build() -> BalancedBatchSampler:
        # A switch penalty makes each plan depend on the previous step's strategy.
        bal = make_balancer(4, switch_penalty=2e-3)
        return BalancedBatchSampler(lens, bal, config(tokens_per_step=400, seed=3, plan_ahead=3), rank=1, world_size=4)

    full = build()
    reference = list(full) + list(full)  # two epochs
    assert len({s.plan.strategy for s in reference}) > 1, "the test needs strategy switches"
    first = build()
    it = iter(first)
    for _ in range(k):
        next(it)
    wait_until_planned_ahead(first)  # the balancer's own record is now steps ahead of the consumer
    state = first.state_dict()
    it.close()
    resumed = build()
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert [s.step for s in rest] == [s.step for s in reference[k:]]
    assert _pieces_of(rest) == _pieces_of(reference[k:])
    assert [s.plan.digest for s in rest] == [s.plan.digest for s in reference[k:]]
    again = list(first)  # a broken-off epoch restarts from its first step
    assert [s.plan.digest for s in again] == [s.plan.digest for s in reference[: len(again)]]


def test_state_at_epoch_end_continues_with_the_next_epoch() -> None:
    lens = np.arange(1, 21)
    s = BalancedBatchSampler(lens, make_balancer(1), config(sequences_per_step=5), world_size=1)
    epoch0 = list(s)
    state = s.state_at(0, len(epoch0), len(epoch0))
    r = BalancedBatchSampler(lens, make_balancer(1), config(sequences_per_step=5), world_size=1)
    r.load_state_dict(state)
    nxt = list(r)
    assert nxt[0].epoch == 1 and nxt[0].step == len(epoch0)
    assert [x.plan.sample_ids() for x in nxt] == [x.plan.sample_ids() for x in s]


@pytest.mark.parametrize(("old", "new"), [(2, 3), (4, 2), (3, 2)])
def test_resume_on_a_different_world_size_loses_and_repeats_nothing(old: int, new: int) -> None:
    rng = np.random.default_rng(2)
    lens = rng.integers(1, 2 * CAP, size=120)
    cfg = config(tokens_per_step=700, seed=9)
    before = samplers(lens, old, cfg)
    iters = [iter(s) for s in before]
    k = 3
    done = [[next(it) for _ in range(k)] for it in iters]
    state = before[0].state_dict()
    for it in iters:
        it.close()
    after = samplers(lens, new, config(tokens_per_step=700, seed=9))
    for s in after:
        s.load_state_dict(state)
    with pytest.warns(UserWarning, match=f"resuming on {new} ranks"):
        rest = run_epoch(after)
    first = [sorted({(sid, a, b) for row in rows for mb in row.micro_batches for sid, a, b in zip(mb.sample_ids, mb.starts, mb.ends)}) for rows in zip(*done)]
    everything = Counter(p for step in first + rest for p in step)
    assert sorted(sid for sid, _, _ in everything) == list(range(lens.size))
    assert set(everything.values()) == {1}
    single = BalancedBatchSampler(lens, make_balancer(2), config(tokens_per_step=700, seed=9), world_size=2)
    assert [sorted(x.plan.sample_ids()) for x in single] == [sorted(sid for sid, _, _ in s) for s in first + rest]


def test_resume_refuses_a_balancer_below_the_runs_max_length() -> None:
    lens = np.arange(1, 200)
    with pytest.warns(UserWarning, match="split"):
        s = BalancedBatchSampler(lens, make_balancer(2), config(sequences_per_step=8, overlong="split"), world_size=2)
    state = s.state_dict()
    with pytest.warns(UserWarning, match="split"):
        small = BalancedBatchSampler(lens, make_balancer(1), config(sequences_per_step=8, overlong="split"), world_size=1)
    with pytest.raises(ValueError, match="max_length=128 tokens but the new balancer holds at most 64"):
        small.load_state_dict(state)


def test_state_is_small_versioned_and_validated() -> None:
    lens = np.arange(1, 30)
    s = BalancedBatchSampler(lens, make_balancer(2), config(sequences_per_step=4, seed=1), world_size=2)
    state = s.state_dict()
    assert state["version"] == 2 and state["epoch"] == 0 and state["step_in_epoch"] == 0
    assert state["world_size"] == 2 and state["seed"] == 1 and "balancer" in state
    with pytest.raises(ValueError, match="seed changed 1 → 2"):
        BalancedBatchSampler(lens, make_balancer(2), config(sequences_per_step=4, seed=2), world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="sequences_per_step changed 4 → 5"):
        BalancedBatchSampler(lens, make_balancer(2), config(sequences_per_step=5, seed=1), world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="had 29 samples, now 10"):
        BalancedBatchSampler(lens[:10], make_balancer(2), config(sequences_per_step=4, seed=1), world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="version 7"):
        s.load_state_dict({**state, "version": 7})
    with pytest.raises(ValueError, match="lacks"):
        s.load_state_dict({"version": 2})


def test_break_and_set_epoch() -> None:
    lens = np.arange(1, 25)
    s = BalancedBatchSampler(lens, make_balancer(1), config(sequences_per_step=4), world_size=1)
    it = iter(s)
    next(it)
    it.close()
    assert s.epoch == 0 and [x.step_in_epoch for x in s] == list(range(6))
    s.set_epoch(3)
    first = next(iter(s))
    assert first.epoch == 3 and first.step == 6 * 3
