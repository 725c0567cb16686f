"""CostModel.calibrate on the local device (the CPU in CI) and its torch decoder."""

import json
import time

import numpy as np
import pytest
import torch

from balancer.calibrate import build_decoder, calibration_device, local_hardware, measure
from balancer.cost import CostModel
from balancer.specs import model_preset
from strategies import Layout


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin at every barrier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_decoder_matches_the_spec_and_trains():
    spec = model_preset("tiny")
    net = build_decoder(spec, torch.device("cpu"), torch.float32, seed=1)
    assert sum(p.numel() for p in net.parameters()) == spec.num_parameters
    ids = torch.randint(0, spec.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    loss = net(ids)
    assert abs(loss.item() - np.log(spec.vocab_size)) < 1.0  # near uniform at initialisation
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(8):
        opt.zero_grad()
        net(ids).backward()
        opt.step()
    assert net(ids).item() < loss.item() - 1.0  # memorises one sequence


def test_decoder_is_causal():
    spec = model_preset("tiny")
    net = build_decoder(spec, torch.device("cpu"), torch.float32)
    hidden: list[torch.Tensor] = []
    net.norm.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    a = torch.randint(0, spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[0, 20:] = (b[0, 20:] + 1) % spec.vocab_size  # change only the future of position 19
    with torch.no_grad():
        net(a), net(b)
    assert torch.allclose(hidden[0][0, :20], hidden[1][0, :20], atol=1e-5)
    assert not torch.allclose(hidden[0][0, 20:], hidden[1][0, 20:])


def test_calibrate_tiny_on_the_local_device():
    """Real timings of the tiny decoder at 256-2048 tokens on the CPU (a few seconds).

    Robustness against a busy machine (tests run side by side on 2 cores) comes from what
    is measured, not from loose bounds: one torch thread timed by the process's CPU time,
    so the time other processes hold the cores does not count (the wall time of two
    threads on an oversubscribed machine stalls at every intra-op barrier); every length
    warmed up, lengths timed round-robin, and the fastest of 3 runs fitted. At 2048
    tokens attention is about 2/3 of the tiny model's FLOPs, so a clearly positive
    quadratic term is a real property.
    """
    threads = torch.get_num_threads()
    model = CostModel.calibrate("tiny", repeats=3, num_threads=1, clock="process", progress=False)
    assert torch.get_num_threads() == threads
    assert (model.meta["num_threads"], model.meta["clock"], model.meta["statistic"]) == (1, "process", "min")
    assert model.source == "calibrated" and model.layouts == [Layout()]
    cost = model.cost(Layout())
    assert cost.a > 0 and cost.b > 0
    assert model.fit_r2(Layout()) > 0.9
    meta = model.meta
    assert meta["device_type"] == calibration_device().type and meta["torch"] == torch.__version__
    assert meta["lengths"] == [256, 512, 768, 1024, 1280, 1536, 2048] and len(meta["seconds"]) == 7
    assert meta["model"]["name"] == "tiny" and meta["custom_step_fn"] is False
    # the quadratic term matters at the long end: t(2048) is far more than 8 × t(256)
    t = cost.seconds(np.array([256, 2048]))
    assert t[1] > 8 * t[0]
    again = CostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.cost(Layout()) == cost and again.fit_r2("tp1") == model.fit_r2("tp1")


def test_calibrate_with_a_user_step_fn():
    # a "model" whose step takes 2 ms + 2e-5 s per token + 1e-8 s per token²: sleeps of 7-70 ms,
    # long next to the scheduler's wake-up jitter even on a busy machine
    a, b, c = 1e-8, 2e-5, 2e-3

    def step(length: int) -> None:
        time.sleep(c + b * length + a * length * length)

    model = CostModel.calibrate(
        None, step_fn=step, lengths=[200, 600, 1000, 1400, 1800], token_capacity=2048,
        layout="tp2", warmup=0, repeats=5, progress=False,
    )
    cost = model.cost(Layout(tp=2))
    assert cost.token_capacity == 2048 and model.meta["custom_step_fn"] is True and model.meta["model"] is None
    assert cost.a == pytest.approx(a, rel=0.25) and cost.b == pytest.approx(b, rel=0.25)
    assert model.fit_r2("tp2") > 0.99


def test_calibrate_argument_errors():
    with pytest.raises(ValueError, match="pass token_capacity"):
        CostModel.calibrate(None, step_fn=lambda s: None, lengths=[10, 20, 30])
    with pytest.raises(ValueError, match="give a model spec"):
        CostModel.calibrate(None, token_capacity=10)
    with pytest.raises(ValueError, match="length 1 is too short"):
        measure(lambda s: None, [1, 8], device=torch.device("cpu"))
    with pytest.raises(ValueError, match="statistic='mean' must be one of"):
        measure(lambda s: None, [4, 8], device=torch.device("cpu"), statistic="mean")
    with pytest.raises(ValueError, match="clock='gpu' must be one of"):
        measure(lambda s: None, [4, 8], device=torch.device("cpu"), clock="gpu")
    with pytest.raises(ValueError, match="cannot time cuda work"):
        measure(lambda s: None, [4, 8], device=torch.device("cuda"), clock="process")


def test_measure_statistics():
    calls = []

    def step(length: int) -> None:
        calls.append(length)
        time.sleep(0.001 * (1 + (len(calls) % 3 == 0)))  # every third call is slow

    run = measure(step, [8, 16], device=torch.device("cpu"), warmup=1, repeats=3, statistic="median")
    assert calls == [8, 16] + [8, 16] * 3 and run.runs.shape == (3, 2) and run.statistic == "median"
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
