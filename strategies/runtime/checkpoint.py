"""Save and load the sharded state with ``torch.distributed.checkpoint``, at any world size.

Every rank's chunk of a parameter (:mod:`~.state`) is one shard of a 1-D ``DTensor``
(``Shard(0)`` over all ranks) of the parameter's flattened full values, so the checkpoint
stores each parameter once, as a whole, whatever the world size; DCP reads back the
overlapping pieces when the loading job has another world size (``ceil`` chunks, as
``DTensor`` cuts uneven tensors, which is how the layout cuts them too).

Keys: ``model.<name>`` (fp32 master values), ``optimizer.sharded.<name>.<key>`` (a
per-element optimizer state such as Adam's ``exp_avg``, sharded like its parameter) and
``optimizer.replicated.<name>.<key>`` (anything else, e.g. ``step``, equal on all ranks).
The optimizer's hyperparameters (``param_groups``) are not stored: they come from the
optimizer builder of the loading job (a learning-rate schedule restores its own state).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from .state import ParamSlot, ShardedState

__all__ = ["save_state", "load_state"]

_SHARDED = "optimizer.sharded."
_REPLICATED = "optimizer.replicated."


def _mesh(state: ShardedState) -> DeviceMesh:
    group = state.group if state.group is not None else dist.group.WORLD
    return DeviceMesh.from_group(group, state.device.type)


def _dtensor(local: torch.Tensor, slot: ParamSlot, mesh: DeviceMesh) -> DTensor:
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(slot.numel,), stride=(1,))


def _per_element(value: Any, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape == param.shape


def save_state(state: ShardedState, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Write the master parameters and the optimizer state to directory ``path`` (collective)."""
    mesh = _mesh(state)
    out: dict[str, Any] = {}
    for name, p in state.named_parameters():
        slot = state.slot(name)
        out[f"model.{name}"] = _dtensor(p.detach(), slot, mesh)
        for key, value in optimizer.state.get(p, {}).items():
            if _per_element(value, p):
                out[f"{_SHARDED}{name}.{key}"] = _dtensor(value, slot, mesh)
            else:
                out[f"{_REPLICATED}{name}.{key}"] = value
    dcp.save(out, checkpoint_id=str(path))


def load_state(state: ShardedState, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Read a checkpoint of :func:`save_state` (any world size) into ``state`` and ``optimizer`` (collective)."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    mesh = _mesh(state)
    template: dict[str, Any] = {}
    for name, p in state.named_parameters():
        slot = state.slot(name)
        key = f"model.{name}"
        if key not in metadata:
            raise ValueError(f"checkpoint {path} has no parameter {name!r}; it was saved from another model")
        saved = tuple(getattr(metadata[key], "size", ()))
        if saved != (slot.numel,):
            raise ValueError(
                f"checkpoint {path}: parameter {name!r} has {saved} elements, the model {slot.numel} "
                f"(shape {slot.shape}); load it into the same model configuration"
            )
        template[key] = _dtensor(p.detach(), slot, mesh)  # loads in place into the master chunk
        for full_key, md in metadata.items():
            for prefix in (_SHARDED, _REPLICATED):
                if not full_key.startswith(f"{prefix}{name}."):
                    continue
                props = getattr(md, "properties", None)
                if prefix == _SHARDED:
                    local = torch.zeros(slot.local_numel, dtype=props.dtype, device=state.device)
                    template[full_key] = _dtensor(local, slot, mesh)
                elif props is not None:  # a replicated tensor
                    template[full_key] = torch.zeros(tuple(md.size), dtype=props.dtype)
                else:  # a pickled Python object
                    template[full_key] = None
    dcp.load(template, checkpoint_id=str(path))

    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): name for name, p in state.named_parameters()}
    opt_state: dict[int, dict[str, Any]] = {}
    for index, p in enumerate(params):
        name = names.get(id(p))
        if name is None:
            raise ValueError("the optimizer holds a tensor that is not a parameter chunk of the sharded state")
        entry: dict[str, Any] = {}
        for prefix in (_SHARDED, _REPLICATED):
            start = f"{prefix}{name}."
            for full_key, value in template.items():
                if full_key.startswith(start):
                    entry[full_key[len(start):]] = value.to_local() if isinstance(value, DTensor) else value
        if entry:
            opt_state[index] = entry
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": opt_state, "param_groups": current["param_groups"]})
