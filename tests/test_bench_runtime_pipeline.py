"""benchmarks/runtime_pipeline.py: the 1F1B replay, the formula it is checked against, and a
tiny two-process run whose report must follow from its own raw timings."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import benchmarks.runtime_pipeline as rp
from balancer.data import read_lengths
from strategies.runtime import run_local

times = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(pp=st.integers(1, 5), v=st.integers(1, 12), f=times, b=times)
def test_replay_of_equal_micro_batches_on_equal_stages_is_the_planners_formula(pp, v, f, b) -> None:
    fwd, bwd = np.full((pp, v), f), np.full((pp, v), b)
    assert rp.simulate_1f1b(fwd, bwd) == pytest.approx((v + pp - 1) * (f + b))
    assert rp.formula_seconds(fwd, bwd) == pytest.approx((v + pp - 1) * (f + b))


@settings(max_examples=80, deadline=None)
@given(pp=st.integers(1, 4), v=st.integers(1, 10), data=st.data())
def test_replay_is_at_least_every_stages_work_and_the_first_micro_batchs_round_trip(pp, v, data) -> None:
    grid = st.lists(st.lists(times, min_size=v, max_size=v), min_size=pp, max_size=pp)
    fwd, bwd = np.array(data.draw(grid)), np.array(data.draw(grid))
    replay = rp.simulate_1f1b(fwd, bwd)
    assert replay >= (fwd + bwd).sum(axis=1).max() - 1e-12  # a stage runs its work one op at a time
    assert replay >= (fwd[:, 0] + bwd[:, 0]).sum() - 1e-12  # micro-batch 0 goes down and back up


def test_the_formula_is_optimistic_when_long_micro_batches_alternate_with_short() -> None:
    # forward ⅓, backward ⅔ on two equal stages: 1F1B stalls where the formula sees no bubble
    t = np.array([0.55, 0.27, 0.88, 0.21, 0.8, 0.06, 0.98, 0.12, 0.29, 0.09, 0.78])
    fwd, bwd = np.stack([t, t]) / 3, np.stack([t, t]) * 2 / 3
    assert rp.formula_seconds(fwd, bwd) == pytest.approx(t.sum() + t.max())
    assert rp.simulate_1f1b(fwd, bwd) > 1.3 * rp.formula_seconds(fwd, bwd)


TINY = {
    "model": {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
              "ffn_hidden_size": 64},
    "max_length": 64, "tokens_per_step": 256, "micro_batch_tokens": 128,
    "calibration_repeats": 1, "stage_repeats": 1, "steps": 3, "warmup": 0,
}


@pytest.fixture(scope="module")
def result() -> dict:
    return run_local(rp.run_rank, 2, (TINY, read_lengths("code_kafka")), timeout_s=240, collective_timeout_s=120)[0]


def test_every_timed_step_runs_both_strategies_on_the_same_batch(result) -> None:
    by_step: dict[int, set] = {}
    for r in result["rows"]:
        by_step.setdefault(r["step"], set()).add(r["strategy"])
        assert sum(map(len, (mb for rep in r["replicas"] for mb in rep["micro_batches"]))) > 0
        assert all(rep["measured_s"] > 0 for rep in r["replicas"] if rep["micro_batches"])
    assert by_step == {k: {"tp1pp2x1", "tp1x2"} for k in range(3)}
    for r in result["rows"]:  # every planned sequence, and only those, ran: the same tokens under both
        assert sum(sum(mb) for rep in r["replicas"] for mb in rep["micro_batches"]) == r["tokens"]
    assert len({(r["step"], r["tokens"]) for r in result["rows"]}) == 3


def test_the_pipeline_numbers_follow_from_the_measured_stage_times(result) -> None:
    pp2 = [r["replicas"][0] for r in result["rows"] if r["strategy"] == "tp1pp2x1"]
    assert len(pp2) == 3
    for e in pp2:
        fwd, bwd = np.array(e["stage_forward_s"]), np.array(e["stage_backward_s"])
        assert fwd.shape == bwd.shape == (2, len(e["micro_batches"]))
        assert (fwd > 0).all() and (bwd > 0).all()
        assert e["replay_s"] == pytest.approx(rp.simulate_1f1b(fwd, bwd))
        t = (fwd + bwd).max(axis=0)
        assert e["formula_s"] == pytest.approx(t.sum() + t.max())
        assert e["stage_imbalance"] == pytest.approx((fwd[1] + bwd[1]).sum() / (fwd[0] + bwd[0]).sum())


def test_the_calibration_fits_every_part_with_the_per_sequence_term(result) -> None:
    assert set(result["fits"]) == {"tp1", "stage0", "stage1", "busiest (tp1pp2)"}
    cal = result["calibration_micro_batches"]
    assert len({len(mb) for mb in cal}) > 2 and max(sum(mb) for mb in cal) <= TINY["micro_batch_tokens"]
    secs = result["calibration_seconds"]
    busiest = np.maximum(secs["stage0"], secs["stage1"])
    assert len(busiest) == len(cal) and (busiest > 0).all()
    # each fit is CostModel.fit's NNLS of a, b, c and d on its own timings
    for name, seconds in {**secs, "busiest (tp1pp2)": busiest}.items():
        refit = rp.fit_summary(rp.CostModel.fit(cal, seconds, token_capacity=TINY["micro_batch_tokens"]))
        assert result["fits"][name] == pytest.approx(refit)
        assert all(refit[k] >= 0 for k in "abcd") and math.isfinite(refit["r2"])


def test_the_summary_and_the_report_are_the_per_step_ratios(result) -> None:
    res = {"result": result, "summary": rp.summarise(result), "settings": TINY, "date": "d", "command": "c",
           "lengths": "code_kafka", "machine": {"cpu": "x", "cpus": 2, "load": [0, 0, 0], "torch": "t"}}
    s, steps = res["summary"], rp.per_step(result)
    assert s["timed_steps"] == 3
    for r in steps:
        assert r["pipeline_model_error"] == pytest.approx(r["pp2_measured_over_planner"]
                                                          / r["control_measured_over_estimate"])
        product = r["formula_over_planner"] / r["formula_over_replay"] * r["measured_over_replay"]
        assert product == pytest.approx(r["pp2_measured_over_planner"])
    for key in ("pipeline_model_error", "formula_over_replay", "pp2_measured_over_planner"):
        assert s[key] == pytest.approx(float(np.median([r[key] for r in steps])))
    md = rp.markdown(res)
    assert f"**{s['pipeline_model_error']:.2f}**" in md and f"**{s['formula_over_replay']:.2f}**" in md
    assert "Expected, and why" in md and all(f"\n| {k} | " in md for k in range(3))
