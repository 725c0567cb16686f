"""Lengths of a plain map-style dataset, read from its samples once.

A Hugging Face ``datasets.Dataset`` gives its lengths from Arrow offsets without reading
a row (:mod:`dataloader.lengths`). A plain ``torch.utils.data.Dataset`` has no such
column, so when no ``lengths=`` are given the loader reads every sample once — on every
rank, at construction — and takes the length of its token field (and, when samples carry
labels, the loss tokens: labels ``!= -100`` after the first token, as the collator counts
them). That costs one ``__getitem__`` per sample: cheap for pre-tokenised data, a full
tokenisation pass for datasets that tokenise on the fly — then pass ``lengths=`` (an
array, a file or a callable) instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .lengths import IGNORE_INDEX, check_lengths

__all__ = ["ScannedLengths", "scan_dataset"]

_PROGRESS_ABOVE = 100_000
"""Datasets with more samples than this show a progress bar while being read."""


@dataclass(frozen=True, slots=True)
class ScannedLengths:
    lengths: np.ndarray
    """int64[n] tokens per sample."""
    loss_tokens: np.ndarray | None
    """int64[n] loss-carrying tokens per sample when the samples have labels, else ``None`` (``length − 1``)."""


def scan_dataset(
    dataset: Any, *, input_key: str = "input_ids", labels_key: str = "labels", progress: bool | None = None
) -> ScannedLengths:
    """Read every sample of a sized map-style ``dataset`` once: its lengths and loss tokens.

    A sample is a mapping with ``input_key`` (and optionally ``labels_key``), or the token
    ids themselves (a list, array or tensor). Raises ``ValueError`` naming the sample for
    a missing field, an empty sample, or labels on some samples but not others.
    """
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise ValueError(
            f"{type(dataset).__name__} has no len() / [] to read lengths from; pass lengths=... (an array, a "
            "Parquet/Arrow file or a callable index -> tokens)"
        )
    n = len(dataset)
    lengths = np.empty(n, dtype=np.int64)
    loss = np.empty(n, dtype=np.int64)
    with_labels: bool | None = None
    bar = None
    if (n > _PROGRESS_ABOVE) if progress is None else progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="sample", desc="reading lengths")
    try:
        for i in range(n):
            sample = dataset[i]
            if isinstance(sample, Mapping) and input_key not in sample:
                raise ValueError(
                    f"sample {i} has no field {input_key!r} (fields: {sorted(sample)}); set input_key=... or pass lengths="
                )
            lengths[i] = len(sample[input_key] if isinstance(sample, Mapping) else sample)
            has = isinstance(sample, Mapping) and labels_key in sample
            if with_labels is None:
                with_labels = has
            elif has != with_labels:
                raise ValueError(f"sample {i} {'has' if has else 'has no'} {labels_key!r} unlike sample 0; "
                                 "give labels for every sample or none")
            if has:
                labels = np.asarray(sample[labels_key])
                loss[i] = int((labels[1:] != IGNORE_INDEX).sum())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return ScannedLengths(check_lengths(lengths, num_samples=n), loss if with_labels else None)
