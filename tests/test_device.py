"""balancer.device: the device choice, its description and the clock."""

import time

import pytest
import torch

from balancer.device import calibration_device, check_clock, cpu_threads, environment, time_call


def test_time_call_measures_wall_or_process_time():
    cpu = torch.device("cpu")
    assert time_call(lambda: time.sleep(0.02), cpu) >= 0.02
    assert time_call(lambda: time.sleep(0.02), cpu, "process") < 0.01  # sleeping is not CPU work
    with pytest.raises(ValueError, match="cannot time cuda work"):
        check_clock("process", torch.device("cuda"))
    with pytest.raises(ValueError, match="clock='gpu' must be one of"):
        time_call(lambda: None, cpu, "gpu")


def test_environment_and_threads():
    dev = calibration_device()
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    before = torch.get_num_threads()
    with cpu_threads(1):
        env = environment(dev)
        assert env["num_threads"] == 1 and env["torch"] == torch.__version__ and env["device"]
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads=0 must be a positive integer"):
        with cpu_threads(0):
            pass
