"""CostModel.calibrate on the local device (the CPU in CI): packed compositions, the fit of
a, b, c, d, the reliability verdict and the reduced-depth scaling."""

import json
import time
import warnings

import numpy as np
import pytest
import torch

from balancer.calibrate import (
    CalibrationWarning,
    assess,
    calibration_device,
    calibration_micro_batches,
    local_hardware,
    measure,
)
from balancer.cost import CostModel
from balancer.fit import fit_quadratic
from strategies import Layout


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin at every barrier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_compositions_cover_long_short_mixed_and_drawn():
    mbs = calibration_micro_batches(1024, np.array([100, 300, 5000, 1, 40] * 20), seed=1)
    labels = [lab for lab, _ in mbs]
    assert labels[:11] == ["1×128", "1×256", "1×512", "1×768", "1×1,024", "4×256", "16×64", "64×16", "16×16",
                           "512 + 8×64", "256 + 48×16"]
    assert [lab.split(":")[0] for lab in labels[11:]] == ["drawn 1", "drawn 2", "drawn 3", "drawn 4"]
    for _, mb in mbs:
        assert 2 <= min(mb) and sum(mb) <= 1024
    drawn = [mb for lab, mb in mbs if lab.startswith("drawn")]
    assert all(set(mb) <= {100, 300, 1024, 40} for mb in drawn)  # 5000 capped at the budget, 1 left out
    assert drawn == [mb for lab, mb in calibration_micro_batches(1024, np.array([100, 300, 5000, 1, 40] * 20), seed=1)
                     if lab.startswith("drawn")]  # seeded
    counts = {len(mb) for _, mb in mbs}
    assert {1, 4, 16, 64} <= counts  # d is identifiable
    with pytest.raises(ValueError, match="budget 8 must be an integer >= 16"):
        calibration_micro_batches(8)


def test_calibrate_tiny_on_the_local_device():
    """Real timings of the tiny decoder on packed micro-batches of up to 1,024 tokens on the CPU.

    Robustness against a busy machine comes from what is measured, not from loose bounds:
    one torch thread timed by the process's CPU time, every micro-batch warmed up, all of
    them timed round-robin and the fastest of 2 runs fitted. At 1,024 tokens attention is
    about a third of the tiny model's FLOPs: a clearly positive quadratic term.
    """
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # a noisy CI run may be flagged; asserted below
        model = CostModel.calibrate("tiny", token_budget=1024, repeats=2, num_threads=1, clock="process",
                                    progress=False, length_pool=[50, 120, 300, 700])
    assert torch.get_num_threads() == threads
    meta = model.meta
    assert (meta["num_threads"], meta["clock"], meta["statistic"], meta["attention"]) == (1, "process", "min", "sdpa")
    assert model.source == "calibrated" and model.layouts == [Layout()]
    cost = model.cost(Layout())
    assert cost.a > 0 and cost.b > 0
    assert model.fit_r2(Layout()) > 0.9
    assert meta["device_type"] == calibration_device().type and meta["torch"] == torch.__version__
    assert len(meta["micro_batches"]) == len(meta["labels"]) == len(meta["seconds"]) == 15
    assert meta["token_budget"] == 1024 and meta["model"]["name"] == "tiny" and not meta["custom_step_fn"]
    fit = meta["fit"]["tp1"]
    assert fit["fitted_d"] and len(fit["predicted"]) == 15  # packed compositions identify d
    assert meta["reliable"] == (not meta["problems"])
    fit_tokens = max(sum(mb) for mb in meta["micro_batches"])
    assert model.measured_tokens(Layout()) == fit_tokens  # the largest micro-batch the fit has seen
    if calibration_device().type == "cpu":
        # the largest calibrated micro-batch, not what the host's RAM would allow (millions of tokens)
        assert cost.token_capacity == fit_tokens
        assert meta["token_capacity_from"].startswith("the largest calibrated micro-batch")
    again = CostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.cost(Layout()) == cost and again.fit_r2("tp1") == model.fit_r2("tp1")


def test_calibrate_with_a_user_step_fn_recovers_the_per_sequence_term():
    # a "model" whose micro-batch takes c + Σ (a·s² + b·s + d): sleeps of 8-60 ms, long next
    # to the scheduler's wake-up jitter even on a busy machine
    a, b, c, d = 1e-8, 2e-5, 4e-3, 1.5e-3

    def step(mb: tuple[int, ...]) -> None:
        time.sleep(c + sum(a * s * s + b * s + d for s in mb))

    model = CostModel.calibrate(
        None, step_fn=step, micro_batches=[200, 1000, 1800, [100] * 8, [50] * 20, [400, 100, 100], [30] * 30],
        token_capacity=2048, layout="tp2", warmup=0, repeats=3, progress=False,
    )
    cost = model.cost(Layout(tp=2))
    assert cost.token_capacity == 2048 and model.meta["custom_step_fn"] and model.meta["model"] is None
    assert cost.d == pytest.approx(d, rel=0.25) and cost.b == pytest.approx(b, rel=0.25)
    assert model.meta["labels"][:4] == ["1×200", "1×1,000", "1×1,800", "8×100"]
    assert model.fit_r2("tp2") > 0.99 and model.meta["reliable"]


def test_a_launch_bound_profile_is_reported_unreliable():
    """Times that barely grow with the work (the overhead is all there is: `calibrate --model
    tiny` on a GPU) give a warning and ``reliable = False`` instead of a silent model."""

    def step(mb: tuple[int, ...]) -> None:
        time.sleep(0.01 + 1e-7 * sum(mb))

    with pytest.warns(CalibrationWarning) as caught:  # launch-bound, and often a low R² besides
        model = CostModel.calibrate(None, step_fn=step, token_budget=512, token_capacity=512, warmup=0, repeats=3,
                                    progress=False)
    assert any("launch-bound" in str(w.message) for w in caught)
    assert not model.meta["reliable"] and any("launch-bound" in p for p in model.meta["problems"])


def test_assess_flags_low_r2_and_launch_bound_fits():
    mbs = [(s,) for s in (100, 200, 400, 800)] + [(100,) * 4, (50,) * 8]
    good = [1e-5 * sum(m) + 1e-4 * len(m) + 1e-3 for m in mbs]
    assert assess(fit_quadratic(mbs, good), mbs, np.array(good)) == []
    noisy = [0.5, 0.1, 0.9, 0.2, 0.7, 0.1]
    problems = assess(fit_quadratic(mbs, noisy), mbs, np.array(noisy), "test")
    assert any(p.startswith("test: R² =") for p in problems)
    flat = [0.010, 0.0101, 0.0102, 0.0104, 0.0102, 0.0101]
    assert any("launch-bound" in p for p in assess(fit_quadratic(mbs, flat), mbs, np.array(flat)))


def test_reduced_depth_is_timed_and_scaled_per_layer():
    """num_layers=1 of the 2-layer tiny: the micro-batches are timed at depth 1 and depth 0
    and scaled to t_0 + 2·(t_1 − t_0) before the stored fit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        model = CostModel.calibrate("tiny", num_layers=1, micro_batches=[128, 256, 512, [64] * 4, [32] * 8, [16] * 16],
                                    repeats=2, warmup=1, num_threads=1, clock="process", progress=False)
    depth = model.meta["depth"]
    assert (depth["timed_layers"], depth["model_layers"]) == (1, 2)
    t1, t0 = np.array(model.meta["seconds"]), np.array(depth["seconds_no_layers"])
    assert np.allclose(depth["scaled_seconds"], t0 + 2 * np.maximum(t1 - t0, 0.0))
    assert (t0 < t1).all()  # a layer costs something
    assert model.meta["fit"]["tp1"]["measured"] == pytest.approx(depth["scaled_seconds"])
    assert model.meta["model"]["num_layers"] == 2  # the model the coefficients describe
    with pytest.raises(ValueError, match="num_layers=3 must be 1..2"):
        CostModel.calibrate("tiny", num_layers=3)
    with pytest.raises(ValueError, match="cannot reduce a custom step_fn"):
        CostModel.calibrate(None, step_fn=lambda mb: None, num_layers=1, token_capacity=10)


def test_calibrate_argument_errors():
    with pytest.raises(ValueError, match="pass token_capacity"):
        CostModel.calibrate(None, step_fn=lambda mb: None, micro_batches=[10, 20, 30])
    with pytest.raises(ValueError, match="give a model spec"):
        CostModel.calibrate(None, token_capacity=10)
    with pytest.raises(ValueError, match="give micro_batches, or token_budget"):
        CostModel.calibrate(None, step_fn=lambda mb: None, token_capacity=10, micro_batches=[4], token_budget=8)
    with pytest.raises(ValueError, match="length 1 is too short"):
        measure(lambda mb: None, [1, 8], device=torch.device("cpu"))
    with pytest.raises(ValueError, match="statistic='mean' must be one of"):
        measure(lambda mb: None, [4, 8], device=torch.device("cpu"), statistic="mean")
    with pytest.raises(ValueError, match="clock='gpu' must be one of"):
        measure(lambda mb: None, [4, 8], device=torch.device("cpu"), clock="gpu")
    with pytest.raises(ValueError, match="cannot time cuda work"):
        measure(lambda mb: None, [4, 8], device=torch.device("cuda"), clock="process")


def test_measure_statistics_and_micro_batches():
    calls = []

    def step(mb: tuple[int, ...]) -> None:
        calls.append(mb)
        time.sleep(0.001 * (1 + (len(calls) % 3 == 0)))  # every third call is slow

    run = measure(step, [8, [4, 4]], device=torch.device("cpu"), warmup=1, repeats=3, statistic="median")
    assert calls == [(8,), (4, 4)] + [(8,), (4, 4)] * 3 and run.runs.shape == (3, 2) and run.statistic == "median"
    assert run.micro_batches == [(8,), (4, 4)]
    assert np.allclose(run.seconds, np.median(run.runs, axis=0))
    fastest = measure(step, [8, 16], device=torch.device("cpu"), warmup=0, repeats=3)
    assert fastest.statistic == "min" and np.allclose(fastest.seconds, fastest.runs.min(axis=0))
    assert fastest.clock == "wall" and (fastest.runs >= 0.001).all()
    # sleeping uses no CPU: the process clock sees (almost) nothing
    idle = measure(step, [8], device=torch.device("cpu"), warmup=0, repeats=2, clock="process")
    assert idle.clock == "process" and (idle.runs < 0.001).all()


def test_local_hardware_uses_real_memory():
    hw = local_hardware(torch.device("cpu"))
    assert hw.memory_bytes > 2**30 and hw.peak_flops > 0


def test_calibrating_a_7b_shape_never_builds_it_in_host_memory(monkeypatch):
    """The whole calibration path — build, time at depth 1 and 0, fit — of the Llama-7B shape
    with ``num_layers=1`` runs on the meta device standing in for a GPU, while every tensor
    any op creates in host memory is recorded. A build on the host followed by a move (the
    ~28 GB fp32 copy the issue names; here the 0.6 B parameters of the 1-layer copy, 2.4 GB)
    would create host tensors of the embedding's 131 M elements; the calibration itself only
    ever makes the token ids of one micro-batch there."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import balancer.calibrate as calibrate_module
    from balancer.specs import model_preset

    class HostTensors(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    HostTensors.largest = max(HostTensors.largest, t.numel())
            return out

    spec = model_preset("llama-7b")
    monkeypatch.setattr(calibrate_module, "calibration_device", lambda: torch.device("meta"))
    with HostTensors(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # meta "timings" are Python overhead only
        model = CostModel.calibrate(spec, num_layers=1, token_budget=64, token_capacity=4096, repeats=1, warmup=0,
                                    progress=False)
    assert model.meta["depth"] == {**model.meta["depth"], "timed_layers": 1, "model_layers": spec.num_layers}
    assert model.meta["model"]["name"] == spec.name and len(model.meta["seconds"]) >= 8
    assert 0 < HostTensors.largest <= 64, HostTensors.largest  # token ids of ≤ 64-token micro-batches, nothing else
