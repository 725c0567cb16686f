"""The attention kernels' names — torch-free, so a command line can offer them without importing torch."""

from __future__ import annotations

__all__ = ["KERNELS", "KERNEL_CHOICES"]

KERNELS = ("flash_attn", "varlen", "sdpa")
"""Kernel names, in order of preference on CUDA (see :mod:`strategies.kernels.attention`)."""
KERNEL_CHOICES = ("auto", *KERNELS)
"""What a user may ask for: ``"auto"`` (:func:`~strategies.kernels.choose_kernel` decides) or a kernel name."""
