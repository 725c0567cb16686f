"""Sharded model state: fp32 master parameters, gradients and optimizer state split over all ranks.

The layout follows Hydraulis's own code: one fixed, strategy-independent *optimizer
layout* (ZeRO-style), from which every step gathers the chosen strategy's compute
weights and to which every step reduce-scatters the gradients. A strategy switch
therefore moves no state at all.

**Units and chunks.** Parameters are grouped into *units*: one per transformer layer
(``layers.<i>``) and one per other parameter (``embed``, ``final_norm``, ``lm_head``).
Every parameter is flattened and cut into ``world`` equal chunks of
``chunk = ceil(numel / world)`` elements (the last chunks zero-padded); rank ``r`` owns
chunk ``r`` of every parameter. A unit's per-rank *segment* is the concatenation of
this rank's chunks of the unit's parameters, so one unit is one collective:

* **gather** — ``all_gather_into_tensor`` of the segments (cast to the compute dtype
  first, so bf16 crosses the wire) gives a ``(world, segment)`` buffer in which each
  parameter is the block ``[:, offset : offset + chunk]`` — its padded flat values in
  order. The rank cuts its tensor-parallel shard out of it: the compute weights.
* **reduce-scatter** — each rank writes the gradient of its compute shard into a zeroed
  ``(world, segment)`` fp32 buffer at the same places (a replicated parameter only from
  tp rank 0, so every replica contributes every element exactly once; context-parallel
  ranks each add their partial sum), and ``reduce_scatter_tensor`` sums the buffers and
  leaves each owner its chunk: the global gradient of the step, as one device would get it.

The optimizer runs on the chunks: each chunk is an ``nn.Parameter`` viewing the unit's
flat fp32 master segment (its ``.grad`` views the flat gradient segment), so Adam's
moments exist for ``≈ 1/world`` of the model on every rank.

**Memory per rank** (``P`` parameters, ``w`` ranks, AdamW): resident, ``16·P/w`` bytes
(fp32 master 4 + fp32 gradient 4 + two fp32 moments 8, plus padding of at most ``w−1``
elements per parameter); during a step, the compute shard of the strategy's layout
(weights in the compute dtype + fp32 gradient accumulators: 6 bytes per parameter of
the shard in bf16, 8 in fp32); transiently, one unit's gather buffer (the whole unit in
the compute dtype) or reduce-scatter buffer (the whole unit in fp32) plus one full
parameter. The largest unit is a transformer layer (or the embedding).

**For pipeline stages.** Ownership is per parameter chunk and grouped per layer, and
:meth:`ShardedState.gather` / :meth:`ShardedState.reduce_scatter` work unit by unit, so
a pipeline stage keeps the compute weights of its own units only (``keep=False`` for the
others) and reduce-scatters zeros for the units it does not hold. Every rank takes part
in every unit's collective (the owners span all ranks), so each element's gradient
arrives once per replica: from the one stage that holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .parallel import tp_range

__all__ = ["ParamSlot", "ShardLayout", "ShardedState", "tp_shard", "unit_name"]

# torch >= 2.13 names these *_single; older versions only have the *_tensor spellings
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def unit_name(param_name: str) -> str:
    """The unit a parameter belongs to: ``layers.<i>`` for a layer's parameters, else its own name."""
    parts = param_name.split(".")
    if len(parts) > 2 and parts[0] == "layers":
        return f"layers.{parts[1]}"
    return param_name


@dataclass(frozen=True, slots=True)
class ParamSlot:
    """Where one parameter lives in the sharded layout (sizes in elements)."""

    name: str
    unit: int
    """Index of its unit in :attr:`ShardLayout.units`."""
    shape: tuple[int, ...]
    """Full (unsharded) shape."""
    split_dim: int | None
    """Dim cut over tensor-parallel ranks, ``None`` for a replicated parameter."""
    chunk: int
    """Elements per owner: ``ceil(numel / world)``."""
    offset: int
    """Offset of the chunk inside its unit's per-rank segment."""
    local_numel: int
    """Real (unpadded) elements of this rank's chunk; 0 on trailing ranks of a tiny tensor."""

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass(frozen=True, slots=True)
class ShardLayout:
    """The strategy-independent owner map: which rank owns which elements of every parameter."""

    world: int
    rank: int
    units: tuple[str, ...]
    """Unit names in collective order (model parameter order)."""
    slots: tuple[ParamSlot, ...]
    """Every parameter, in model order."""
    segment: tuple[int, ...]
    """Per-rank segment size of each unit (elements)."""

    @classmethod
    def build(cls, params: Sequence[tuple[str, tuple[int, ...], int | None]], world: int, rank: int) -> "ShardLayout":
        """Layout of ``(name, full shape, tp split dim)`` parameters over ``world`` ranks."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"ShardLayout: rank {rank} outside a world of {world} ranks")
        units: list[str] = []
        sizes: list[int] = []
        slots: list[ParamSlot] = []
        for name, shape, split in params:
            u = unit_name(name)
            if u not in units:
                units.append(u)
                sizes.append(0)
            j = units.index(u)
            numel = int(torch.Size(shape).numel())
            chunk = max(1, -(-numel // world))
            local = max(0, min(chunk, numel - rank * chunk))
            slots.append(ParamSlot(name, j, tuple(shape), split, chunk, sizes[j], local))
            sizes[j] += chunk
        return cls(world=world, rank=rank, units=tuple(units), slots=tuple(slots), segment=tuple(sizes))

    def unit_slots(self, unit: int) -> list[ParamSlot]:
        return [s for s in self.slots if s.unit == unit]

    @property
    def num_parameters(self) -> int:
        """Elements of the full model."""
        return sum(s.numel for s in self.slots)


def tp_shard(full: torch.Tensor, split_dim: int | None, tp_size: int, tp_rank: int) -> torch.Tensor:
    """The view of ``full`` that tp rank ``tp_rank`` of ``tp_size`` computes with: its
    :func:`~.parallel.tp_range` chunk of ``split_dim`` (uneven where the dim does not divide)."""
    if split_dim is None or tp_size == 1:
        return full
    start, size = tp_range(full.shape[split_dim], tp_size, tp_rank)
    return full.narrow(split_dim, start, size)


class ShardedState:
    """This rank's chunks of the fp32 master parameters and gradients, and the collectives.

    ``group``: the process group the chunks are spread over (default: every rank).
    """

    def __init__(self, layout: ShardLayout, device: torch.device, compute_dtype: torch.dtype,
                 group: dist.ProcessGroup | None = None) -> None:
        self.layout = layout
        self.device = device
        self.compute_dtype = compute_dtype
        self.group = group
        self.master = [torch.zeros(n, dtype=torch.float32, device=device) for n in layout.segment]
        """Flat fp32 master segment of every unit (this rank's chunks, padding zero)."""
        self.grad = [torch.zeros(n, dtype=torch.float32, device=device) for n in layout.segment]
        """Flat fp32 gradient segment of every unit (written by :meth:`reduce_scatter`)."""
        self._params: dict[str, nn.Parameter] = {}
        for s in layout.slots:
            p = nn.Parameter(self.master[s.unit][s.offset : s.offset + s.local_numel])  # a view: shares storage
            p.grad = self.grad[s.unit][s.offset : s.offset + s.local_numel]
            self._params[s.name] = p
        self._slots = {s.name: s for s in layout.slots}

    # -- what the optimizer sees ----------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, chunk)`` of every parameter: 1-D fp32 views of the master segments."""
        yield from self._params.items()

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self._params.values()

    def slot(self, name: str) -> ParamSlot:
        return self._slots[name]

    # -- filling --------------------------------------------------------------------------
    def load_full(self, name: str, full: torch.Tensor) -> None:
        """Set parameter ``name``'s chunk from its full value (any device or dtype)."""
        s = self._slots[name]
        if tuple(full.shape) != s.shape:
            raise ValueError(f"parameter {name}: value of shape {tuple(full.shape)}, expected {s.shape}")
        lo = self.layout.rank * s.chunk
        with torch.no_grad():
            self._params[name].copy_(full.detach().reshape(-1)[lo : lo + s.local_numel])

    # -- the two collectives --------------------------------------------------------------
    def gather(self, unit: int, tp_size: int = 1, tp_rank: int = 0, keep: bool = True) -> dict[str, torch.Tensor]:
        """Compute weights of ``unit``: every parameter's tp shard, contiguous, in the compute dtype.

        ``keep=False``: only serve this rank's chunks to the others (a pipeline rank whose
        stage does not hold the unit) and return ``{}``.
        """
        world, n = self.layout.world, self.layout.segment[unit]
        send = self.master[unit].to(self.compute_dtype)
        buf = torch.empty(world * n, dtype=self.compute_dtype, device=self.device)
        _all_gather(buf, send, group=self.group)
        if not keep:
            return {}
        table = buf.view(world, n)
        out = {}
        for s in self.layout.unit_slots(unit):
            full = table[:, s.offset : s.offset + s.chunk].reshape(-1)[: s.numel].view(s.shape)
            w = tp_shard(full, s.split_dim, tp_size, tp_rank).contiguous()
            if w.untyped_storage().nbytes() != w.numel() * w.element_size():
                w = w.clone()  # own exactly the shard, not the gathered unit or full parameter behind it
            out[s.name] = w
        return out

    def reduce_scatter(self, unit: int, grads: dict[str, torch.Tensor | None], tp_size: int = 1,
                       tp_rank: int = 0) -> None:
        """Sum every rank's compute-shard gradients of ``unit`` into the owners' gradient chunks.

        ``grads[name]``: this rank's gradient of its tp shard of ``name`` (any float dtype),
        or ``None`` to contribute nothing (a replicated parameter on a tp rank other than 0).
        """
        world, n = self.layout.world, self.layout.segment[unit]
        buf = torch.zeros(world, n, dtype=torch.float32, device=self.device)
        for s in self.layout.unit_slots(unit):
            g = grads[s.name]
            if g is None:
                continue
            full = torch.zeros(world * s.chunk, dtype=torch.float32, device=self.device)
            tp_shard(full[: s.numel].view(s.shape), s.split_dim, tp_size, tp_rank).copy_(g)
            buf[:, s.offset : s.offset + s.chunk] = full.view(world, s.chunk)
        _reduce_scatter(self.grad[unit], buf.view(-1), group=self.group)

    # -- whole-model helpers --------------------------------------------------------------
    def full(self, kind: str = "param") -> dict[str, torch.Tensor]:
        """Full fp32 tensors (``kind`` ``"param"`` or ``"grad"``) on every rank — for tests and export.

        Collective; holds the whole model once in fp32, unit by unit.
        """
        if kind not in ("param", "grad"):
            raise ValueError(f"kind={kind!r} must be 'param' or 'grad'")
        source = self.master if kind == "param" else self.grad
        world = self.layout.world
        out = {}
        for u, seg in enumerate(source):
            buf = torch.empty(world * seg.numel(), dtype=torch.float32, device=self.device)
            _all_gather(buf, seg, group=self.group)
            table = buf.view(world, -1)
            for s in self.layout.unit_slots(u):
                out[s.name] = table[:, s.offset : s.offset + s.chunk].reshape(-1)[: s.numel].view(s.shape).clone()
        return out

    def grad_norm(self) -> float:
        """Global L2 norm of the gradient (collective; padding is zero)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in self.grad:
            sq += g.double().pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        return float(sq.sqrt())

    def scale_grads(self, factor: float) -> None:
        for g in self.grad:
            g.mul_(factor)

    def nbytes(self) -> dict[str, int]:
        """Bytes of the master and gradient segments this rank holds."""
        return {
            "master": sum(t.numel() * t.element_size() for t in self.master),
            "grad": sum(t.numel() * t.element_size() for t in self.grad),
        }
