"""strategies.plan: JSON round-trip, digest, for_rank, validate."""

import json

import numpy as np
import pytest

from balancer import CostModel, LayoutCost, validate
from strategies import ClusterSpec, Layout, PlanError, ReplicaPlan, StepPlan


def _model() -> CostModel:
    return CostModel.from_coefficients(
        {Layout(2): LayoutCost(a=1e-6, b=1e-3, c=0.01, token_capacity=4096),
         Layout(1): LayoutCost(a=4e-6, b=2e-3, c=0.01, token_capacity=1024)}
    )


def _plan(model: CostModel, lengths: np.ndarray) -> StepPlan:
    mbs = {0: [[0, 1], [2]], 1: [[3]], 2: [[]]}
    reps = []
    layouts = [Layout(2), Layout(1), Layout(1)]
    ranks = [(0, 1), (2,), (3,)]
    for j in range(3):
        est = model.replica_seconds([lengths[m] for m in mbs[j]] if any(mbs[j]) else [], layouts[j])
        reps.append(ReplicaPlan(ranks[j], layouts[j], mbs[j], est))
    return StepPlan(
        step=3, strategy="tp2x1+tp1x2", replicas=tuple(reps),
        est_step_seconds=max(r.est_seconds for r in reps), lower_bound_seconds=0.0,
        global_sequences=4, global_tokens=int(lengths.sum()), global_loss_tokens=int((lengths - 1).sum()),
        solver="test", plan_seconds=0.5,
    )


def test_roundtrip_digest_and_for_rank():
    model = _model()
    lengths = np.array([1000, 2000, 500, 900])
    plan = _plan(model, lengths)
    validate(plan, lengths, sample_ids=range(4), cost_model=model, cluster=ClusterSpec(num_ranks=4))
    again = StepPlan.from_json(plan.to_json())
    assert again == plan and again.digest == plan.digest
    d = json.loads(plan.to_json())
    assert d["digest"].startswith("sha256:") and d["version"] == 1
    # plan_seconds is measured and does not enter the digest
    other = StepPlan.from_dict({**d, "plan_seconds": 9.0, "digest": ""})
    assert other.digest == plan.digest
    rp = plan.for_rank(1)
    assert (rp.replica_index, rp.tp_rank, rp.layout) == (0, 1, Layout(2))
    assert rp.micro_batches == ((0, 1), (2,))
    assert plan.for_rank(3).micro_batches == ((),)
    with pytest.raises(PlanError, match="rank 7 is not in plan"):
        plan.for_rank(7)


def test_tampered_digest_rejected():
    plan = _plan(_model(), np.array([1000, 2000, 500, 900]))
    d = json.loads(plan.to_json())
    d["replicas"][1]["micro_batches"] = [[3, 3]]
    with pytest.raises(PlanError, match="digest mismatch"):
        StepPlan.from_dict(d)


def test_validate_catches_broken_invariants():
    model = _model()
    lengths = np.array([1000, 2000, 500, 900])
    plan = _plan(model, lengths)
    with pytest.raises(PlanError, match="missing"):
        validate(plan, lengths, sample_ids=range(5))
    bad = StepPlan.from_dict({**json.loads(plan.to_json()), "digest": "", "global_tokens": 1})
    with pytest.raises(PlanError, match="global_tokens=1"):
        validate(bad, lengths)
    small = CostModel.from_coefficients(
        {Layout(2): LayoutCost(a=1e-6, b=1e-3, c=0.01, token_capacity=4096),
         Layout(1): LayoutCost(a=4e-6, b=2e-3, c=0.01, token_capacity=800)})  # 900 > 800
    with pytest.raises(PlanError, match="holds 900 tokens, above the layout's capacity of 800"):
        validate(plan, lengths, cost_model=small)
    d = json.loads(plan.to_json())
    d["replicas"][0]["est_seconds"] = 0.0
    d["digest"] = ""
    with pytest.raises(PlanError, match="est_seconds"):
        validate(StepPlan.from_dict(d), lengths, cost_model=model)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["replicas"][0]["micro_batches"][0].__setitem__(1, 2.7), r"plan.replicas\[0\].micro_batches\[0\]\[1\]=2.7 must be an integer"),
        (lambda d: d["replicas"][0]["micro_batches"][0].__setitem__(1, 1.0), r"micro_batches\[0\]\[1\]=1.0 must be an integer"),
        (lambda d: d["replicas"][1].__setitem__("ranks", [True]), r"plan.replicas\[1\].ranks\[0\]=True must be an integer"),
        (lambda d: d["replicas"][0]["layout"].__setitem__("tp", 2.5), r"plan.replicas\[0\].layout.tp=2.5 must be an integer"),
        (lambda d: d.pop("replicas"), r"plan lacks \['replicas'\]"),
        (lambda d: d.__setitem__("replicas", {"0": 1}), "plan.replicas must be a JSON list, got dict"),
        (lambda d: d["replicas"].__setitem__(0, [1]), r"plan.replicas\[0\] must be a JSON object, got list"),
        (lambda d: d["replicas"][0].pop("micro_batches"), r"plan.replicas\[0\] lacks \['micro_batches'\]"),
        (lambda d: d.__setitem__("step", "3"), "plan.step='3' must be an integer"),
        (lambda d: d.__setitem__("est_step_seconds", "fast"), "plan.est_step_seconds='fast' must be a finite number"),
        (lambda d: d.__setitem__("version", True), "plan version True is not supported"),
    ],
)
def test_plan_json_is_read_strictly(edit, message):
    """An edited plan is an error naming the field, never a rounded id that still passes its digest."""
    d = json.loads(_plan(_model(), np.array([1000, 2000, 500, 900])).to_json())
    edit(d)
    with pytest.raises(PlanError, match=message):
        StepPlan.from_dict(d)


def test_plan_json_of_the_wrong_shape_is_a_plan_error():
    with pytest.raises(PlanError, match="plan must be a JSON object, got list"):
        StepPlan.from_json("[1, 2]")
    with pytest.raises(PlanError, match="plan is not valid JSON"):
        StepPlan.from_json("{")
