"""balancer.simulation: the sampler, the per-step traces, the result and the plan dump."""

import json
import math

import numpy as np
import pytest

from balancer.baselines import BASELINES, make_baseline
from balancer.cost import CostModel, LayoutCost
from balancer.selector import BalancerConfig
from balancer.simulation import (
    BALANCER,
    BALANCER_LOOKAHEAD,
    SimulationConfig,
    global_batches,
    load_jsonl_plans,
    simulate,
)
from balancer.validation import validate
from strategies import ClusterSpec, Layout, Strategy

MODEL = CostModel.from_coefficients(
    {
        Layout(1): LayoutCost(a=4e-9, b=2e-5, c=2e-3, token_capacity=2048),
        Layout(2): LayoutCost(a=2.2e-9, b=1.1e-5, c=2e-3, token_capacity=4096),
        Layout(4): LayoutCost(a=1.2e-9, b=6e-6, c=2e-3, token_capacity=8192),
        Layout(1, 2): LayoutCost(a=2.2e-9, b=1.1e-5, c=2e-3, token_capacity=4096),
        Layout(1, 4): LayoutCost(a=1.2e-9, b=6e-6, c=2e-3, token_capacity=8192),
    }
)
CLUSTER = ClusterSpec(num_ranks=8, ranks_per_node=4)
LENGTHS = np.random.default_rng(0).lognormal(6.5, 1.2, 600).astype(np.int64).clip(1, 20000)
CANDIDATES = [
    Strategy.homogeneous(Layout(4), 8),
    Strategy.homogeneous(Layout(2), 8),
    Strategy.from_counts([(Layout(4), 1), (Layout(1), 4)]),
]


def test_global_batches_cover_each_epoch_once_within_budget() -> None:
    lengths = np.array([5, 9, 3, 7, 1, 8, 2, 6, 4, 30])
    it = global_batches(lengths, 12, seed=1)
    epoch0 = []
    while True:
        b = next(it)
        assert b.epoch == 0
        assert lengths[b.sample_ids].sum() <= 12 or b.sample_ids.size == 1
        epoch0.append(b)
        if b.last_in_epoch:
            break
    assert sorted(np.concatenate([b.sample_ids for b in epoch0]).tolist()) == list(range(10))
    assert [b.step for b in epoch0] == list(range(len(epoch0)))
    nxt = next(it)
    assert nxt.epoch == 1 and nxt.step == len(epoch0)
    again = [next(global_batches(lengths, 12, seed=1)).sample_ids.tolist()]
    assert again[0] == epoch0[0].sample_ids.tolist()
    # greedy cut: the next sequence would overflow the budget
    for b in epoch0[:-1]:
        order = np.concatenate([x.sample_ids for x in epoch0])
        after = order[list(order).index(b.sample_ids[-1]) + 1]
        assert lengths[b.sample_ids].sum() + lengths[after] > 12


def test_baselines_only_simulation(tmp_path) -> None:
    dump = tmp_path / "plans.jsonl"
    cfg = SimulationConfig(tokens_per_step=30_000, num_steps=6, max_length=8192, dump_plans=str(dump), seed=2,
                           policies=tuple(BASELINES), baseline_options={"padded": {"micro_batch_size": 1}})
    res = simulate(LENGTHS, CLUSTER, MODEL, cfg)
    assert set(res.traces) == set(BASELINES) and res.max_length == 8192
    capped = np.minimum(LENGTHS, 8192)
    batches = global_batches(capped, 30_000, seed=2)
    want_tokens = sum(int(capped[next(batches).sample_ids].sum()) for _ in range(6))
    # length_grouped's sampler orders the epoch itself: its steps come from that order
    grouped = make_baseline("length_grouped", CLUSTER, None, MODEL, max_length=8192, micro_batch_size=1)
    own = global_batches(capped, 30_000, seed=2, order=lambda s, perm: grouped.epoch_order(s, perm, 30_000))
    own_steps = [next(own) for _ in range(6)]
    assert not np.array_equal(own_steps[0].sample_ids, next(global_batches(capped, 30_000, seed=2)).sample_ids)
    for name, tr in res.traces.items():
        assert tr.step_seconds.shape == (6,) and np.all(tr.step_seconds > 0)
        want = sum(int(capped[b.sample_ids].sum()) for b in own_steps) if name == "length_grouped" else want_tokens
        if name == "wlb_llm":  # it may still hold outliers after the last step: those are not trained
            assert int(tr.tokens.sum()) <= want
        else:
            assert int(tr.tokens.sum()) == want, name
        assert tr.summary()["batch_size_violations"] == 0, name  # fixed batch size: 15,000..38,192 tokens
        assert not tr.flushed.any()  # 6 steps stay inside the first epoch
        assert np.all(tr.imbalance >= 1 - 1e-12)
        assert np.all(tr.lower_bound <= tr.step_seconds * (1 + 1e-9))
        s = tr.summary()
        assert math.isclose(s["tokens_per_second"], int(tr.tokens.sum()) / tr.step_seconds.sum())
    assert res.traces["bfd"].padding_tokens.sum() == 0
    assert res.best_baseline() in BASELINES
    text = json.dumps(res.to_dict())
    assert '"wlb_llm"' in text
    table = res.summary_table()
    assert table.count("\n") == 2 + len(BASELINES)
    lines = list(load_jsonl_plans(dump))
    assert len(lines) == 6 * len(BASELINES)
    for name, step, plan in lines:
        validate(plan, capped, cost_model=MODEL, cluster=CLUSTER)
        assert plan.step == step


def test_epoch_ends_are_recorded_and_described() -> None:
    from hydraulis.commands.simulate import describe_steps

    # LENGTHS hold ~0.9M tokens: 300K-token steps make epochs of 3-4 steps, the last one short
    cfg = SimulationConfig(tokens_per_step=300_000, num_steps=9, max_length=8192, seed=0, policies=("multipack",))
    res = simulate(LENGTHS, CLUSTER, MODEL, cfg)
    capped = np.minimum(LENGTHS, 8192)
    batches = global_batches(capped, 300_000, seed=0)
    want = tuple(b.step for b in (next(batches) for _ in range(9)) if b.last_in_epoch)
    assert res.epoch_ends == want and len(want) >= 2 and res.to_dict()["epoch_ends"] == list(want)
    tokens = res.traces["multipack"].tokens
    lines = describe_steps(res, 300_000, "test lengths")
    assert lines[0].startswith(f"simulated 9 steps of at most 300,000 tokens: {tokens.mean():,.0f} tokens per step")
    assert f"{len(want)} of them end an epoch of test lengths (steps {', '.join(map(str, want))})" in lines[1]
    assert f"remaining {tokens[list(want)].mean():,.0f} tokens on average" in lines[1]


def test_balancer_against_baselines() -> None:
    cfg = SimulationConfig(tokens_per_step=40_000, num_steps=4, seed=1,
                           policies=(BALANCER, "multipack", "hydraulis_random_restart"))
    res = simulate(LENGTHS, CLUSTER, MODEL, cfg, candidates=CANDIDATES)
    assert res.max_length == 8192 and res.num_candidates == 3
    bal = res.traces[BALANCER]
    assert set(bal.strategy) <= {c.name for c in CANDIDATES}
    assert np.all(bal.step_seconds >= bal.lower_bound * (1 - 1e-9))
    up = res.speedup()
    assert set(up) == {"multipack", "hydraulis_random_restart"} and all(v > 0 for v in up.values())
    d = res.to_dict()
    assert d["best_baseline"] in up and "speedup_vs" in d
    assert "| balancer |" in res.summary_table()


def test_config_and_input_errors() -> None:
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        SimulationConfig(tokens_per_step=10, policies=("fast",))
    with pytest.raises(ValueError, match="tokens_per_step=0 must be an integer >= 1"):
        SimulationConfig(tokens_per_step=0)
    with pytest.raises(ValueError, match="name one policy twice"):
        SimulationConfig(tokens_per_step=10, policies=("bfd", "bfd"))
    with pytest.raises(ValueError, match="needs candidates"):
        simulate(LENGTHS, CLUSTER, MODEL, SimulationConfig(tokens_per_step=1000))
    with pytest.raises(ValueError, match="set SimulationConfig.max_length"):
        simulate(LENGTHS, CLUSTER, MODEL, SimulationConfig(tokens_per_step=1000, policies=("bfd",)))
    with pytest.raises(ValueError, match="above the longest sequence any candidate holds"):
        simulate(LENGTHS, CLUSTER, MODEL, SimulationConfig(tokens_per_step=1000, max_length=9000),
                 candidates=CANDIDATES)


def test_a_refusing_peer_is_reported_not_scored() -> None:
    """Megatron's DpBalancedScheduler asserts on a batch that fits one group: those steps are
    left out of its trace, the run goes on and says why."""
    cfg = SimulationConfig(tokens_per_step=3_000, num_steps=3, max_length=2048, seed=1,
                           policies=("megatron_dp_balanced", "multipack"))
    res = simulate(LENGTHS, CLUSTER, MODEL, cfg)
    tr = res.traces["megatron_dp_balanced"]
    assert tr.refused.all() and tr.summary()["refused_steps"] == 3 and tr.tokens.sum() == 0
    assert not res.traces["multipack"].refused.any()
    assert "Not enough samples to move" in res.refused["megatron_dp_balanced"]
    assert "refused 3 of 3 steps" in res.summary_table() and res.to_dict()["refused"]
    assert "refused every step" in res.summary_table() and res.best_baseline() == "multipack"


def test_lookahead_policy_regroups_windows_within_the_band() -> None:
    budget = 40_000
    cfg = SimulationConfig(tokens_per_step=budget, num_steps=8, seed=3, policies=(BALANCER, BALANCER_LOOKAHEAD, "wlb_llm"))
    la = BalancerConfig(lookahead_steps=4)
    res = simulate(LENGTHS, CLUSTER, MODEL, cfg, candidates=CANDIDATES, lookahead_config=la)  # checks exactly once
    bal, ahead = res.traces[BALANCER], res.traces[BALANCER_LOOKAHEAD]
    assert int(ahead.tokens.sum()) == int(bal.tokens.sum())
    in_band = (bal.tokens >= 0.9 * budget) & (bal.tokens <= 1.1 * budget)  # as sampled
    assert np.all((ahead.tokens[in_band] >= 0.9 * budget) & (ahead.tokens[in_band] <= 1.1 * budget))
    assert ahead.step_seconds.sum() < bal.step_seconds.sum()  # 1.509 s vs 1.572 s; never slower by construction
    assert res.best_baseline() == "wlb_llm"  # the look-ahead row is not a baseline
    assert "faster |" in res.summary_table()
    with pytest.raises(ValueError, match="lookahead_config=BalancerConfig"):
        simulate(LENGTHS, CLUSTER, MODEL, cfg, candidates=CANDIDATES)


def test_fixed_batch_size_check_flags_steps_outside_the_range() -> None:
    """The check ``simulate`` reports per policy can fail: a step under half the budget or
    over the budget plus one longest sequence counts, an epoch's last (flushed) step and a
    refused step do not, and the table marks the policy."""
    from balancer.simulation_result import PolicyTrace

    budget, longest = 1000, 300
    tr = PolicyTrace.empty("x", 6, budget=budget, longest=longest)
    tr.tokens[:] = [500, 1300, 499, 1301, 100, 10]
    tr.flushed[4] = True  # the epoch's last step may be short
    tr.refused[5] = True  # a refused step trained nothing
    check = tr.batch_size()
    assert check["batch_size_violations"] == 2  # 499 and 1301
    assert check["step_tokens_min"] == pytest.approx(0.499) and check["step_tokens_max"] == pytest.approx(1.301)
    tr.tokens[[2, 3]] = [700, 1000]
    assert tr.batch_size()["batch_size_violations"] == 0


def test_every_policy_keeps_the_batch_size_across_epochs() -> None:
    """All baselines and both Balancer rows over several epochs (the short last batch of
    each is exempt): none trains under half the budget or over budget + max_length."""
    capped_total = int(np.minimum(LENGTHS, 8192).sum())
    budget = capped_total // 3 + 1  # ~3 steps an epoch, the last one short
    cfg = SimulationConfig(tokens_per_step=budget, num_steps=10, max_length=8192, seed=4,
                           policies=(BALANCER, BALANCER_LOOKAHEAD, *BASELINES),
                           baseline_options={"padded": {"micro_batch_size": 1}})
    res = simulate(LENGTHS, CLUSTER, MODEL, cfg, candidates=CANDIDATES, lookahead_config=BalancerConfig(lookahead_steps=2))
    assert len(res.epoch_ends) >= 2
    for name, tr in res.traces.items():
        assert tr.summary()["batch_size_violations"] == 0, name
        ends = tr.flushed | tr.refused  # Megatron may refuse an epoch's short last batch
        assert set(np.flatnonzero(tr.flushed)) <= set(res.epoch_ends) <= set(np.flatnonzero(ends)), name
        assert "✓" in next(line for line in res.summary_table().splitlines() if line.startswith(f"| {name} |"))
