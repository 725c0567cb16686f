"""What the runtime benchmarks share (``runtime.py``, ``runtime_pipeline.py``): global batches
drawn from a length file, packed micro-batches of synthetic tokens, and the packed
micro-batches a calibration times (``hydraulis calibrate``'s compositions).

Imported as ``benchmarks.runtime_common`` once the script has put the repository root first
on ``sys.path``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from balancer.calibrate import calibration_micro_batches
from balancer.cost import CostModel
from strategies import Layout

CALIBRATION_DRAWN = 2
"""Micro-batches drawn from the length file in a calibration (besides the fixed compositions)."""


def global_batches(lengths: np.ndarray, tokens_per_step: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches of lengths drawn without replacement, each up to ``tokens_per_step`` tokens."""
    order = np.random.default_rng(seed).permutation(lengths.size)
    out, cur, total = [], [], 0
    for i in np.tile(order, 1 + steps * tokens_per_step // max(1, int(lengths.sum()))):
        s = int(lengths[i])
        if total + s > tokens_per_step and cur:
            out.append(np.array(cur, dtype=np.int64))
            if len(out) == steps:
                break
            cur, total = [], 0
        cur.append(s)
        total += s
    return out


def pack(lens: list[int], vocab: int, rng: np.random.Generator, glt: int) -> dict[str, torch.Tensor | int]:
    """A packed micro-batch (design.md §7) of random token ids from ``rng``; ``glt``: the step's loss tokens."""
    ids = rng.integers(0, vocab, size=int(sum(lens)), dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    labels = ids.copy()
    labels[cu[:-1]] = -100
    pos = np.arange(ids.size) - np.repeat(cu[:-1], lens)
    return {"input_ids": torch.from_numpy(ids)[None], "labels": torch.from_numpy(labels)[None],
            "position_ids": torch.from_numpy(pos)[None], "cu_seqlens": torch.from_numpy(cu),
            "global_loss_tokens": glt}


def calibration_set(lengths: np.ndarray, max_length: int, capacity: int) -> list[tuple[int, ...]]:
    """The packed micro-batches a calibration times: ``hydraulis calibrate``'s compositions at a
    budget of ``capacity`` tokens, drawn from ``lengths``, without a sequence over ``max_length``."""
    comps = calibration_micro_batches(capacity, np.minimum(lengths, max_length), seed=0, num_drawn=CALIBRATION_DRAWN)
    return [mb for _, mb in comps if max(mb) <= max_length]


def fit_summary(cost: CostModel, layout: Layout | None = None) -> dict[str, Any]:
    """The fitted coefficients of ``layout`` (default ``tp1``; seconds, tokens) and the fit's R²."""
    layout = layout or Layout(1)
    lc = cost.cost(layout)
    return {"a": lc.a, "b": lc.b, "c": lc.c, "d": lc.d, "r2": cost.fit_r2(layout)}
