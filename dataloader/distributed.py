"""torch.distributed defaults of the loader: rank and world size, the plan-exchange group.

The loader works without torch.distributed (one process, or ranks given explicitly);
when a default process group is initialised it takes rank and world size from it and
exchanges plans over a dedicated gloo group.
"""

from __future__ import annotations

from typing import Any

from strategies.plan import StepPlan

__all__ = ["check_world", "dist_ready", "plan_group", "rank_and_world", "resolve_sync"]


def dist_ready() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_initialized()


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if dist_ready():
        import torch.distributed as dist

        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    rank = 0 if rank is None else int(rank)
    world_size = 1 if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in 0..world_size-1 with world_size={world_size} >= 1")
    return rank, world_size


def resolve_sync(mode: str, world_size: int) -> str:
    if mode == "auto":
        return "broadcast" if world_size > 1 and dist_ready() else "none"
    if mode != "none" and not dist_ready():
        raise ValueError(f"plan_sync={mode!r} needs an initialised torch.distributed process group; use plan_sync='none'")
    return mode


def plan_group(sync: str, process_group: Any) -> Any:
    """A dedicated gloo group for plan exchange (created collectively: every rank builds the sampler)."""
    if sync == "none":
        return None
    import torch.distributed as dist

    if process_group is not None:
        if dist.get_world_size(process_group) != dist.get_world_size():
            raise ValueError(
                f"process_group has {dist.get_world_size(process_group)} ranks but plans are exchanged among all "
                f"{dist.get_world_size()}; pass a group of every rank (or none: a gloo group is created)"
            )
        return process_group
    return dist.new_group(backend="gloo")


def check_world(plan: StepPlan, world_size: int) -> None:
    if plan.num_ranks != world_size:
        raise ValueError(
            f"plan for step {plan.step} covers {plan.num_ranks} ranks but the sampler runs on {world_size}; "
            "build the balancer's ClusterSpec with num_ranks=world_size"
        )
