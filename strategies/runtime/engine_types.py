"""The Engine's plain types: its run choices (:class:`EngineConfig`, validated on
construction) and what one optimizer step reports (:class:`StepResult`: loss, per-rank
compute seconds, phase times in seconds, tokens, resident bytes).

:class:`strategies.runtime.engine.Engine` takes the first and returns the second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from strategies.kernels import KERNELS
from strategies.layout import Layout

__all__ = ["EngineConfig", "StepResult"]


@dataclass(kw_only=True)
class EngineConfig:
    """Run choices of the :class:`Engine` (runtime objects are constructor arguments)."""

    token_capacity: Mapping[str, int] | Callable[[Layout], int] | None = None
    """Most tokens one packed micro-batch may hold per layout: a mapping layout name →
    tokens, or a function such as ``CostModel.token_capacity``. ``None``: not checked."""
    max_grad_norm: float | None = None
    """Clip the global gradient L2 norm to this value before the optimizer step (None: off)."""
    autocast_dtype: torch.dtype | None = None
    """Compute dtype: forward passes run under ``torch.autocast`` with it and the compute
    weights are gathered in it (e.g. ``torch.bfloat16`` on GPUs); ``None`` keeps fp32.
    Master parameters, gradients and optimizer state stay fp32."""
    attention: str = "auto"
    """Attention kernel: ``"auto"`` or one of ``flash_attn``, ``varlen``, ``sdpa``
    (see :func:`strategies.kernels.choose_kernel`)."""
    seed: int = 0
    """Seed of the per-parameter initialisation when the model is given as a ModelConfig."""
    group_timeout_s: float | None = None
    """Timeout of every process group the engine creates, seconds; ``None``: the job's own
    (the default group's, from ``init_process_group(timeout=...)``), or 300 s when torch
    does not expose it."""
    broadcast_parameters: bool = True
    """When the model is given as a callable: use rank 0's initial values on every rank."""
    clock: Callable[[], float] = time.perf_counter
    """Clock of every measured time, seconds: wall time by default; ``time.process_time``
    measures a CPU process's own work (with one torch thread), which other processes on a
    shared machine cannot inflate."""

    def __post_init__(self) -> None:
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"EngineConfig: max_grad_norm={self.max_grad_norm} must be > 0 or None")
        if self.group_timeout_s is not None and not self.group_timeout_s > 0:
            raise ValueError(f"EngineConfig: group_timeout_s={self.group_timeout_s} must be > 0 seconds")
        if self.autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"EngineConfig: autocast_dtype={self.autocast_dtype} must be None, bfloat16 or float16")
        if self.attention != "auto" and self.attention not in KERNELS:
            raise ValueError(f"EngineConfig: attention={self.attention!r} must be 'auto' or one of {list(KERNELS)}")


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """What one optimizer step did. ``loss`` and ``rank_seconds`` are equal on every rank."""

    step: int
    strategy: str
    loss: float
    """Global token-mean next-token cross-entropy of the step (nats)."""
    rank_seconds: tuple[float, ...]
    """Measured forward+backward seconds of every rank (index = rank), for ``Balancer.observe``."""
    gather_seconds: float
    """This rank's time gathering the compute weights, seconds."""
    sync_seconds: float
    """This rank's gradient reduce-scatter time, seconds (includes waiting for slower ranks)."""
    optimizer_seconds: float
    """This rank's clipping + optimizer step time, seconds."""
    step_seconds: float
    """This rank's wall time of the whole ``Engine.step`` call, seconds."""
    tokens: int
    """Tokens of this rank's packed micro-batches (whole rows, before cp sharding)."""
    global_loss_tokens: int
    """The loss normaliser of the step (tokens)."""
    grad_norm: float | None
    """Global gradient L2 norm before clipping (only computed when clipping is on)."""
    resident_bytes: Mapping[str, int] = field(default_factory=dict)
    """Bytes this rank held for the model during the step, measured from the live tensors
    after the backward pass: ``master``, ``grad`` (fp32 chunks), ``optimizer`` (its state,
    measured after the optimizer step), ``compute_weights`` and ``compute_grads`` (the
    layout's compute shard and its fp32 gradient accumulators)."""
