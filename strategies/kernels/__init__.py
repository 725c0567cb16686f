"""Causal attention over packed rows: the kernels, and the one place that chooses between them.

The floor of :mod:`strategies` that holds torch code both the runtime (which trains with
it) and the balancer (whose calibration and measurement time it) may import, so that
what is calibrated is what is trained: :func:`choose_kernel` makes the choice for both.

* :mod:`.segments` — the attention layout of one packed micro-batch
  (:class:`AttentionSegments`, :func:`build_segments`), built once per micro-batch.
* :mod:`.attention` — the kernels (``flash_attn``, ``varlen``, ``sdpa``),
  :func:`choose_kernel`, the self-check :func:`kernel_support` against
  :func:`reference_attention`, and :func:`causal_attention`, which runs the chosen one.
* :mod:`.names` — :data:`KERNELS` and :data:`KERNEL_CHOICES`, without torch.

Public names other than the kernel names are imported on first use: ``import
strategies.kernels`` (a command line listing the choices) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .names import KERNEL_CHOICES, KERNELS

_EXPORTS: dict[str, str] = {
    "AttentionSegments": "segments",
    "build_segments": "segments",
    "KernelSupport": "attention",
    "available_kernels": "attention",
    "causal_attention": "attention",
    "choose_kernel": "attention",
    "kernel_support": "attention",
    "reference_attention": "attention",
}

__all__ = [
    "KERNELS",
    "KERNEL_CHOICES",
    "AttentionSegments",
    "KernelSupport",
    "available_kernels",
    "build_segments",
    "causal_attention",
    "choose_kernel",
    "kernel_support",
    "reference_attention",
]

if TYPE_CHECKING:  # pragma: no cover - static analysers see the eager imports
    from .attention import (
        KernelSupport,
        available_kernels,
        causal_attention,
        choose_kernel,
        kernel_support,
        reference_attention,
    )
    from .segments import AttentionSegments, build_segments


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function (and never see the submodule)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
