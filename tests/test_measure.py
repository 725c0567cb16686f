"""balancer.measure: plans run replica by replica against a timer, compared with the cost model."""

import numpy as np
import pytest

from balancer.cost import CostModel, LayoutCost
from balancer.measure import execute_plan, summarize, summary_table
from strategies import ClusterSpec, Layout
from strategies.plan import ReplicaPlan, StepPlan

COST = LayoutCost(a=1e-8, b=1e-5, c=2e-3, d=5e-4, token_capacity=4096)
MODEL = CostModel.from_coefficients({Layout(): COST, Layout(tp=2): COST})
LENGTHS = np.array([1000, 200, 300, 50, 2000, 400, 10, 30])


def _plan(micro_batches: list[list[list[int]]], layout: Layout = Layout(), step: int = 0) -> StepPlan:
    reps = []
    rank = 0
    for mbs in micro_batches:
        est = MODEL.replica_seconds([LENGTHS[m] for m in mbs if m], layout) if any(mbs) else 0.0
        reps.append(ReplicaPlan(tuple(range(rank, rank + layout.size)), layout,
                                tuple(tuple(m) for m in mbs) if any(mbs) else ((),), est))
        rank += layout.size
    return StepPlan(
        step=step, strategy=f"{layout.name}x{len(reps)}", replicas=tuple(reps),
        est_step_seconds=max(r.est_seconds for r in reps), lower_bound_seconds=0.0,
        global_sequences=sum(len(m) for mbs in micro_batches for m in mbs),
        global_tokens=int(sum(LENGTHS[m].sum() for mbs in micro_batches for m in mbs if m)),
        global_loss_tokens=0, solver="test", plan_seconds=0.0,
    )


def test_a_timer_that_is_the_cost_model_measures_the_estimate():
    """A device that runs every micro-batch in exactly ``Σ (a·s² + b·s + d) + c`` seconds
    measures each replica at its estimate: ratio 1, the same step time and imbalance."""
    calls = []

    def timer(mb: tuple[int, ...]) -> float:
        calls.append(mb)
        return COST.micro_batch_seconds(mb)

    plan = _plan([[[0, 1], [2, 3]], [[4]], [[5, 6, 7]], []])
    m = execute_plan(plan, LENGTHS, MODEL, timer, policy="balancer")
    assert calls == [(1000, 200), (300, 50), (2000,), (400, 10, 30)]  # replica after replica, in order
    assert [r.measured_seconds for r in m.replicas] == pytest.approx([r.est_seconds for r in m.replicas])
    assert m.ratios() == pytest.approx([1.0, 1.0, 1.0])  # the idle replica has no ratio
    assert m.measured_step_seconds == pytest.approx(m.est_step_seconds)
    assert m.measured_imbalance == pytest.approx(m.est_imbalance) and m.measured_imbalance > 1.0
    assert [(r.micro_batches, r.sequences, r.tokens) for r in m.replicas] == [(2, 4, 1550), (1, 1, 2000), (1, 3, 440), (0, 0, 0)]
    assert m.to_dict()["replicas"][0]["ratio"] == pytest.approx(1.0)


def test_padded_policies_run_rectangles_and_stragglers_run_slower():
    seen = []
    plan = _plan([[[0, 1, 2]], [[3, 4]]])
    m = execute_plan(plan, LENGTHS, MODEL, lambda mb: seen.append(mb) or COST.micro_batch_seconds(mb), padded=True)
    assert seen == [(1000, 1000, 1000), (2000, 2000)]
    assert m.replicas[0].tokens == 3000 and m.ratios() == pytest.approx([1.0, 1.0])  # score is padded too
    slow = ClusterSpec(num_ranks=2, ranks_per_node=2, speed=(1.0, 0.5))
    m = execute_plan(plan, LENGTHS, MODEL, COST.micro_batch_seconds, cluster=slow)
    assert m.replicas[1].measured_seconds == pytest.approx(2 * COST.micro_batch_seconds((50, 2000)))
    assert m.ratios() == pytest.approx([1.0, 1.0])


def test_replicas_of_several_ranks_cannot_run_on_one_device():
    with pytest.raises(ValueError, match=r"replica 0 .* has layout tp2 \(2 ranks\); measured plans run one-rank"):
        execute_plan(_plan([[[0]], [[1]]], Layout(tp=2)), LENGTHS, MODEL, COST.micro_batch_seconds)


def test_summary_compares_policies_by_measured_step_time():
    fast = execute_plan(_plan([[[0, 1, 2]], [[3, 4, 5]]]), LENGTHS, MODEL, COST.micro_batch_seconds, policy="balancer")
    slow = execute_plan(_plan([[[0, 1, 2, 3, 4]], [[5]]]), LENGTHS, MODEL,
                        lambda mb: 1.1 * COST.micro_batch_seconds(mb), policy="multipack")
    s = summarize([fast, slow])
    assert s["balancer"]["reference_speedup"] == pytest.approx(1.0)
    assert s["multipack"]["reference_speedup"] == pytest.approx(slow.measured_step_seconds / fast.measured_step_seconds)
    assert s["multipack"]["ratio_median"] == pytest.approx(1 / 1.1)
    assert s["multipack"]["abs_error_median"] == pytest.approx(1 - 1 / 1.1)
    assert s["multipack"]["measured_imbalance"] > s["balancer"]["measured_imbalance"]
    table = summary_table(s)
    assert "| multipack |" in table and "0.909 [0.909–0.909]" in table and "| balancer |" in table
