"""The worker side of the map-style loader: fetch a micro-batch's samples, collate, ship.

The planned micro-batches are the batches of a real ``torch.utils.data.DataLoader``: its
batch sampler yields :class:`~dataloader.spec.MicroBatchSpec` objects, its workers fetch
the samples (cut by the over-long policy), collate them and ship the result back (large
tensors in pinned flat buffers when ``pin_memory`` is on).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.utils.data as tud

from .batch import cut_sample
from .collate import Collator
from .sampler import BalancedBatchSampler, SamplerStep
from .spec import MicroBatchSpec

__all__ = ["INLINE_BYTES_PINNED", "CollateSpec", "FetchDataset", "SpecFeed", "ship", "unship"]


class FetchDataset(tud.Dataset):  # type: ignore[type-arg]
    """Wraps the user's dataset: one ``__getitems__(spec)`` fetches a micro-batch's samples."""

    def __init__(self, dataset: Any, input_key: str, keys: Sequence[str]) -> None:
        self.dataset = dataset
        self.input_key = input_key
        self.keys = tuple(keys)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, spec: MicroBatchSpec) -> tuple[MicroBatchSpec, list[Any]]:
        ids = list(spec.sample_ids)
        if not ids:
            return spec, []
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = list(getitems(ids)) if getitems is not None else [self.dataset[i] for i in ids]
        return spec, [cut_sample(s, spec, j, self.input_key, self.keys) for j, s in enumerate(samples)]


INLINE_BYTES_PINNED = 64 * 1024
"""With ``pin_memory``, tensors up to this size travel inline; larger ones in pinned flat buffers."""


class Shipped(NamedTuple):
    """A collated dict packed for the trip from a worker process.

    Every tensor crossing the worker queue travels through its own shared-memory file
    descriptor with a handshake (about a millisecond each, more under load); a packed
    micro-batch has six. Instead, tensors go inline as numpy arrays inside the pickle
    (a memory copy, far cheaper at micro-batch sizes), except — with ``pin_memory`` —
    those above 64 KiB, which are concatenated into one flat tensor per dtype that the
    DataLoader's pinning thread pins (``pin_memory`` recurses into this named tuple), so
    the views rebuilt in the main process are pinned as well.
    """

    buffers: tuple[torch.Tensor, ...]
    layout: tuple[tuple[Any, ...], ...]
    """``("t", key, buffer, offset, shape)``, ``("n", key, ndarray)`` or ``("v", key, value)``."""


def ship(out: Any, inline_bytes: int | None) -> Any:
    if type(out) is not dict or tud.get_worker_info() is None:
        return out
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    sizes: dict[torch.dtype, int] = {}
    layout: list[tuple[Any, ...]] = []
    for key, value in out.items():
        if not (isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.requires_grad):
            layout.append(("v", key, value))
        elif inline_bytes is None or value.numel() * value.element_size() <= inline_bytes:
            layout.append(("n", key, value.numpy()))
        else:
            group = groups.setdefault(value.dtype, [])
            layout.append(("t", key, list(groups).index(value.dtype), sizes.get(value.dtype, 0), tuple(value.shape)))
            sizes[value.dtype] = sizes.get(value.dtype, 0) + value.numel()
            group.append(value.reshape(-1))
    return Shipped(tuple(torch.cat(ts) for ts in groups.values()), tuple(layout))


def unship(out: Any) -> Any:
    if not isinstance(out, Shipped):
        return out
    rebuilt: dict[str, Any] = {}
    for entry in out.layout:
        kind, key = entry[0], entry[1]
        if kind == "v":
            rebuilt[key] = entry[2]
        elif kind == "n":
            rebuilt[key] = torch.from_numpy(entry[2])
        else:
            _, _, g, off, shape = entry
            rebuilt[key] = out.buffers[g][off : off + math.prod(shape)].view(shape)
    return rebuilt


@dataclass(frozen=True)
class CollateSpec:
    """Collate ``(spec, samples)``: hydraulis collators get the spec, plain functions the samples."""

    collate: Any
    inline_bytes: int | None = None
    """Tensors up to this many bytes leave a worker inline (``None``: all of them)."""

    def __call__(self, data: tuple[MicroBatchSpec, list[Any]]) -> tuple[MicroBatchSpec, Any]:
        spec, samples = data
        if isinstance(self.collate, Collator):
            out = self.collate(samples, spec)
        else:
            out = self.collate(samples) if samples else None
        return spec, ship(out, self.inline_bytes)


class SpecFeed:
    """The DataLoader's batch sampler: micro-batch specs of consecutive steps, in order."""

    def __init__(self, sampler: BalancedBatchSampler) -> None:
        self.sampler = sampler
        self.steps: collections.deque[SamplerStep] = collections.deque()

    def __iter__(self) -> Iterator[MicroBatchSpec]:
        steps: collections.deque[SamplerStep] = collections.deque()
        self.steps = steps
        for step in self.sampler:
            steps.append(step)
            yield from step.micro_batches
