"""The per-step compute weights: built from the sharded state, used, and sent back as gradients.

:func:`build_model` turns a :class:`ModelConfig` or a built :class:`GPT` into the module the
forward runs and its :class:`~.state.ShardedState`; the module's own parameters become
empty *holders*. :class:`ComputeWeights` then, each step,

* **installs** the strategy's weights: unit by unit, the rank's tp shard is gathered from
  the owners (in the compute dtype) into the holders, and an fp32 gradient accumulator is
  zeroed for each (fp32 weights: autograd accumulates into it directly; bf16/fp16
  weights: a post-accumulate-grad hook adds each micro-batch's gradient into it and
  drops the low-precision one);
* **returns** the gradients: unit by unit, reduce-scatters the accumulators to the
  owners (a replicated parameter only from tp rank 0) and releases the unit's weights.

A pipeline rank installs only its stage's units (the others are gathered for their
owners and dropped) and returns zeros for the units it does not hold.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Collection, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from .model import GPT, ModelConfig, init_parameter
from .parallel import ParallelContext
from .state import ShardedState, ShardLayout

__all__ = ["ComputeWeights", "build_model", "storage_bytes"]


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _seed_of(seed: int, name: str) -> int:
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)


def build_model(
    model_builder: ModelConfig | Callable[[], GPT],
    *,
    world_size: int,
    rank: int,
    device: torch.device,
    compute_dtype: torch.dtype,
    seed: int = 0,
    broadcast: bool = True,
    check_tp: Iterable[int] = (),
) -> tuple[GPT, ShardedState]:
    """The forward module (parameters emptied into holders) and this rank's sharded state.

    A :class:`ModelConfig` is built on the meta device and initialised one full parameter
    at a time on ``device`` from a generator seeded by ``(seed, parameter name)`` (the same
    values at any world size, for one device type); a callable's :class:`GPT` gives its
    own values (rank 0's when ``broadcast``). ``check_tp``: tp degrees the model must split into.
    """
    from_config = isinstance(model_builder, ModelConfig)
    if from_config:
        with torch.device("meta"):  # shapes only: no rank ever holds the whole model
            model = GPT(model_builder)
    else:
        model = model_builder()
    if not isinstance(model, GPT):
        raise ValueError(f"Engine: model_builder returned {type(model).__name__}, expected strategies.runtime.GPT")
    for tp in check_tp:
        model.config.check_tp(tp)
    splits = model.tp_split_dims()
    named = list(model.named_parameters())
    layout = ShardLayout.build([(n, tuple(p.shape), splits[n]) for n, p in named], world_size, rank)
    state = ShardedState(layout, device, compute_dtype)
    for name, p in named:  # one full parameter at a time, on the device
        if from_config:
            full = torch.empty(p.shape, dtype=torch.float32, device=device)
            gen = torch.Generator(device=device).manual_seed(_seed_of(seed, name))
            init_parameter(name, full, model.config.init_std, gen)
        else:
            full = p.detach().to(device, torch.float32).contiguous()
            if broadcast and world_size > 1:
                dist.broadcast(full, src=0)
        state.load_full(name, full)
    for module in model.modules():
        for leaf, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[leaf] = nn.Parameter(torch.empty(0, device=device, dtype=compute_dtype))
    if not from_config:
        model.to(device)  # buffers of a subclass, if any
    return model, state


class ComputeWeights:
    """Installs a strategy's compute weights into ``model`` and returns their gradients to ``state``."""

    def __init__(self, model: GPT, state: ShardedState) -> None:
        self.model = model
        self.state = state
        self.holders = dict(model.named_parameters())
        self.accumulators: dict[str, torch.Tensor] = {}
        """fp32 gradient sum of every installed weight (the step's micro-batches)."""
        self._empty = torch.empty(0, device=state.device, dtype=state.compute_dtype)
        if state.compute_dtype != torch.float32:
            for name, p in self.holders.items():
                p.register_post_accumulate_grad_hook(self._hook(name))

    def _hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def add(p: torch.Tensor) -> None:
            self.accumulators[name].add_(p.grad)
            p.grad = None
        return add

    def install(self, pc: ParallelContext, units: Collection[int] | None = None) -> None:
        """Gather the weights of ``pc``'s tp shard into the holders; zero the accumulators.

        ``units``: indices of the units this rank computes with (a pipeline stage's); the
        others are gathered for their owners' sake and not kept. ``None``: every unit.
        """
        for unit in range(len(self.state.layout.units)):
            keep = units is None or unit in units
            for name, w in self.state.gather(unit, pc.tp_size, pc.tp_rank, keep=keep).items():
                holder = self.holders[name]
                holder.data = w
                acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                self.accumulators[name] = acc
                holder.grad = acc if w.dtype == torch.float32 else None  # fp32: autograd adds in place
        self.model.weights_tp = pc.tp_size

    def reduce_scatter(self, pc: ParallelContext) -> None:
        """Send every unit's gradients to their owners, then release the unit's weights.

        A unit that was not installed (another pipeline stage's) contributes zeros.
        """
        for unit in range(len(self.state.layout.units)):
            slots = self.state.layout.unit_slots(unit)
            # a replicated parameter's gradient is the same on every tp rank: count it once
            grads = {s.name: self.accumulators.get(s.name) if s.split_dim is not None or pc.tp_rank == 0 else None
                     for s in slots}
            self.state.reduce_scatter(unit, grads, pc.tp_size, pc.tp_rank)
            for s in slots:
                holder = self.holders[s.name]
                holder.data, holder.grad = self._empty, None
                self.accumulators.pop(s.name, None)
        self.model.weights_tp = 1

    def nbytes(self) -> dict[str, int]:
        """Bytes of the installed compute weights and of their fp32 gradient accumulators."""
        return {
            "compute_weights": storage_bytes(p.data for p in self.holders.values()),
            "compute_grads": storage_bytes(self.accumulators.values()),
        }
