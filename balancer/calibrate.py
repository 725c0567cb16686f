"""Time the real forward + backward on the local device, for :meth:`CostModel.calibrate`.

The default workload is a small Llama-style decoder built from a
:class:`~balancer.specs.ModelSpec` (embedding, blocks of RMSNorm → causal
scaled-dot-product attention with rotary positions and grouped KV heads → RMSNorm →
SwiGLU MLP, final norm, LM head, cross-entropy) run on one sequence at a time. A user
``step_fn(length)`` replaces it to time their own model. torch is imported inside the
functions, so ``import balancer`` stays light.

Timing: every length is warmed up, then the lengths are timed round-robin ``repeats``
times (so a burst of background load hits all lengths alike) and one number per length is
kept: the minimum by default — interference from other processes only ever adds time, so
the fastest run is the best estimate of the work itself (the reasoning of Python's
``timeit``) — or the median. On CUDA each run is bracketed by ``torch.cuda.synchronize()``.

The clock is wall time by default. On a shared CPU, ``clock="process"`` measures the
process's CPU time instead (``time.process_time``): time spent preempted by other
processes does not count, so with one torch thread it is the work itself. (With several
threads it adds up their CPU time, spin-waits included, so use it with ``num_threads=1``.)
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from .specs import HARDWARE_PRESETS, HardwareSpec, ModelSpec

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "Measurement",
    "calibration_device",
    "default_lengths",
    "build_decoder",
    "decoder_step_fn",
    "measure",
    "device_name",
    "device_memory_bytes",
    "environment",
    "local_hardware",
    "cpu_threads",
]

CPU_LENGTHS = (256, 512, 768, 1024, 1280, 1536, 2048)
"""Default CPU lengths: with the ``tiny`` model attention overtakes the matmuls near 1.5K
tokens, so this range shows both the linear and the quadratic term in a few seconds."""
CUDA_LENGTHS = (1024, 2048, 4096, 8192, 12288, 16384)
"""Default GPU lengths."""


def calibration_device() -> "torch.device":
    """The device calibration runs on: the current CUDA device if any, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_lengths(device: "torch.device") -> tuple[int, ...]:
    return CUDA_LENGTHS if device.type == "cuda" else CPU_LENGTHS


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


def build_decoder(model: ModelSpec, device: "torch.device", dtype: "torch.dtype", seed: int = 0) -> "torch.nn.Module":
    """A Llama-style decoder of ``model``'s shape on ``device`` (parameters in ``dtype``).

    ``module(input_ids)`` with ``input_ids`` of shape (1, s) returns the mean
    next-token cross-entropy (a scalar).
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            h, d = model.hidden_size, model.head_dim
            self.nh, self.nkv, self.d = model.num_heads, model.num_kv_heads, d
            self.norm1, self.norm2 = RMSNorm(h), RMSNorm(h)
            self.qkv = nn.Linear(h, model.q_size + 2 * model.kv_size, bias=False)
            self.out = nn.Linear(model.q_size, h, bias=False)
            self.up = nn.Linear(h, (2 if model.gated_mlp else 1) * model.ffn_hidden_size, bias=False)
            self.down = nn.Linear(model.ffn_hidden_size, h, bias=False)

        def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            B, T, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).split([self.nh * self.d, self.nkv * self.d, self.nkv * self.d], -1)
            q = rotate(q.view(B, T, self.nh, self.d).transpose(1, 2), cos, sin)  # (B, nh, T, d)
            k = rotate(k.view(B, T, self.nkv, self.d).transpose(1, 2), cos, sin)  # (B, nkv, T, d)
            v = v.view(B, T, self.nkv, self.d).transpose(1, 2)  # (B, nkv, T, d)
            group = self.nh // self.nkv
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, nh, T, d)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, d)
            x = x + self.out(y.transpose(1, 2).reshape(B, T, self.nh * self.d))
            u = self.up(self.norm2(x))
            if model.gated_mlp:
                gate, up = u.chunk(2, dim=-1)
                u = F.silu(gate) * up
            else:
                u = F.gelu(u)
            return x + self.down(u)

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(model.vocab_size, model.hidden_size)
            self.blocks = nn.ModuleList(Block() for _ in range(model.num_layers))
            self.norm = RMSNorm(model.hidden_size)
            self.head = nn.Linear(model.hidden_size, model.vocab_size, bias=False)
            if model.tie_embeddings:
                self.head.weight = self.embed.weight

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            T = input_ids.shape[1]
            d = model.head_dim
            inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=input_ids.device, dtype=torch.float32) / d))
            ang = torch.outer(torch.arange(T, device=input_ids.device, dtype=torch.float32), inv)  # (T, d/2)
            cos = torch.cat((ang.cos(), ang.cos()), -1).to(self.head.weight.dtype)  # (T, d)
            sin = torch.cat((ang.sin(), ang.sin()), -1).to(self.head.weight.dtype)
            x = self.embed(input_ids)  # (1, T, h)
            for block in self.blocks:
                x = block(x, cos, sin)
            logits = self.head(self.norm(x)).float()  # (1, T, V)
            return F.cross_entropy(logits[0, :-1], input_ids[0, 1:])

    torch.manual_seed(seed)
    return Decoder().to(device=device, dtype=dtype)


def decoder_step_fn(
    model: ModelSpec, device: "torch.device", dtype: "torch.dtype", seed: int = 0
) -> Callable[[int], None]:
    """``step(length)``: forward + backward of :func:`build_decoder` on one random sequence."""
    import torch

    net = build_decoder(model, device, dtype, seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def step(length: int) -> None:
        ids = torch.randint(0, model.vocab_size, (1, int(length)), generator=gen).to(device)
        loss = net(ids)
        loss.backward()
        for p in net.parameters():
            p.grad = None

    return step


STATISTICS = ("min", "median")
"""How the timed runs of one length reduce to one number."""
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
"""``wall``: elapsed time; ``process``: CPU time of this process (CPU device only)."""


@dataclass(frozen=True, slots=True)
class Measurement:
    """Seconds per length (minimum or median of the runs), and every run."""

    lengths: np.ndarray
    """int64 tokens, as given."""
    seconds: np.ndarray
    """float64 seconds per length, reduced by ``statistic``."""
    runs: np.ndarray
    """float64 seconds, shape (repeats, len(lengths))."""
    statistic: str
    """``"min"`` or ``"median"``."""
    clock: str
    """``"wall"`` or ``"process"``."""


def measure(
    step_fn: Callable[[int], None],
    lengths: Sequence[int],
    *,
    device: "torch.device",
    warmup: int = 1,
    repeats: int = 5,
    statistic: str = "min",
    clock: str = "wall",
    progress: bool | None = None,
) -> Measurement:
    """Time ``step_fn(length)`` for every length: ``warmup`` untimed runs each, then
    ``repeats`` timed rounds over all lengths; the ``statistic`` (``"min"`` or
    ``"median"``) of each length's runs is kept. ``clock`` is ``"wall"`` or, on the CPU,
    ``"process"`` (CPU time; see the module docstring).

    ``progress=None`` shows a tqdm bar when stderr is a terminal.
    """
    import torch
    from tqdm.auto import tqdm

    lens = np.asarray(list(lengths), dtype=np.int64)
    if lens.ndim != 1 or lens.size == 0:
        raise ValueError("calibrate: give at least one length")
    if (lens < 2).any():
        raise ValueError(f"calibrate: length {int(lens.min())} is too short; use lengths >= 2 tokens")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"calibrate: warmup={warmup} must be >= 0 and repeats={repeats} >= 1")
    if statistic not in STATISTICS:
        raise ValueError(f"calibrate: statistic={statistic!r} must be one of {list(STATISTICS)}")
    if clock not in CLOCKS:
        raise ValueError(f"calibrate: clock={clock!r} must be one of {list(CLOCKS)}")
    if clock == "process" and device.type != "cpu":
        raise ValueError(f"calibrate: clock='process' counts CPU time and cannot time {device.type} work; use clock='wall'")
    now = CLOCKS[clock]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    show = sys.stderr.isatty() if progress is None else progress
    runs = np.empty((repeats, lens.size), dtype=np.float64)
    with tqdm(total=lens.size * (warmup + repeats), desc="calibrate", unit="run", disable=not show) as bar:
        for s in lens:
            for _ in range(warmup):
                step_fn(int(s))
                bar.update()
        sync()
        for r in range(repeats):
            for j, s in enumerate(lens):
                sync()
                t0 = now()
                step_fn(int(s))
                sync()
                runs[r, j] = now() - t0
                bar.update()
    reduce = np.min if statistic == "min" else np.median
    return Measurement(lengths=lens, seconds=reduce(runs, axis=0), runs=runs, statistic=statistic, clock=clock)


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
    """Where a calibration ran: device name, torch version, CPU threads."""
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
