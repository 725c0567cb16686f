"""The device calibration and measured plans run on, and how they time work on it.

One place for the device choice (:func:`calibration_device`: the current CUDA device if
any, else the CPU), its description (:func:`environment`, :func:`local_hardware`) and the
clock (:func:`time_call`): wall time bracketed by ``torch.cuda.synchronize()`` on CUDA, or
on the CPU optionally the process's CPU time (``clock="process"``), which other processes
cannot inflate by preempting it — with one torch thread (:func:`cpu_threads`) the robust
choice on a shared machine. torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .specs import HARDWARE_PRESETS, HardwareSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "CLOCKS",
    "calibration_device",
    "check_clock",
    "cpu_threads",
    "device_memory_bytes",
    "device_name",
    "environment",
    "local_hardware",
    "synchronizer",
    "time_call",
]

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
"""``wall``: elapsed time; ``process``: CPU time of this process (CPU device only)."""


def calibration_device() -> "torch.device":
    """The device calibration runs on: the current CUDA device if any, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_name(device: "torch.device") -> str:
    """Human-readable device name (GPU model, or the CPU's processor string)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux: the CPU model, e.g. "AMD EPYC 7B13"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_memory_bytes(device: "torch.device") -> int:
    """Total memory of ``device`` in bytes (GPU memory, or the machine's RAM for the CPU)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # non-POSIX: assume a modest machine
        return 8 * 1024**3


@contextlib.contextmanager
def cpu_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op CPU threads set to ``num_threads`` (``None``: unchanged)."""
    import torch

    if num_threads is None:
        yield
        return
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"calibrate: num_threads={num_threads!r} must be a positive integer or None")
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def environment(device: "torch.device") -> dict[str, Any]:
    """Where a calibration or measurement ran: device name, torch version, CPU threads."""
    import torch

    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
    }


def local_hardware(device: "torch.device") -> HardwareSpec:
    """A :class:`HardwareSpec` for ``device``: the preset whose name the GPU's name contains
    (H100, A100, H200; the ``cpu`` preset on the CPU, and the H100 preset for other GPUs),
    with the device's real memory size. Used for the memory model of a calibration."""
    name = device_name(device)
    base = HARDWARE_PRESETS["cpu"]
    if device.type == "cuda":
        base = HARDWARE_PRESETS["h100-80g"]
        for preset in HARDWARE_PRESETS.values():
            if preset.name.split("-")[0].lower() in name.lower():
                base = preset
                break
    return base.replace(name=name, memory_bytes=device_memory_bytes(device))


def check_clock(clock: str, device: "torch.device") -> None:
    """Raise ``ValueError`` for an unknown clock or the process clock on a GPU."""
    if clock not in CLOCKS:
        raise ValueError(f"clock={clock!r} must be one of {list(CLOCKS)}")
    if clock == "process" and device.type != "cpu":
        raise ValueError(f"clock='process' counts CPU time and cannot time {device.type} work; use clock='wall'")


def synchronizer(device: "torch.device") -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(fn: Callable[[], Any], device: "torch.device", clock: str = "wall") -> float:
    """Seconds ``fn()`` takes on ``device``, its queued work included (synchronised before and after)."""
    check_clock(clock, device)
    sync = synchronizer(device)
    now = CLOCKS[clock]
    sync()
    t0 = now()
    fn()
    sync()
    return now() - t0
