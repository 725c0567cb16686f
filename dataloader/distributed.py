"""torch.distributed defaults of the loader: rank and world size, the plan-exchange group, its timeout.

The loader works without torch.distributed (one process, or ranks given explicitly with
``plan_sync='none'``); when a default process group is initialised it takes rank and
world size from it and exchanges plans over a dedicated gloo group that waits for a peer
at most the job's own timeout (the default group's, from ``init_process_group(timeout=...)``)
or an explicit ``sync_timeout_s``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from strategies.collectives import group_timeout
from strategies.plan import StepPlan

__all__ = ["check_world", "dist_ready", "group_timeout_s", "plan_group", "rank_and_world", "resolve_sync"]


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
    """The plan-sync mode to run: ``auto`` is ``broadcast`` on several ranks and ``none`` on one.

    ``auto`` never falls back to ``none`` for several ranks: ranks that plan on their own
    and never compare would train on diverged data without a word when their data differs.
    """
    if mode == "auto":
        if world_size == 1:
            return "none"
        if not dist_ready():
            raise ValueError(
                f"plan_sync='auto' on world_size={world_size} ranks needs torch.distributed: it is not initialised yet, "
                "so the ranks could not check that they plan the same steps. Call "
                "torch.distributed.init_process_group(...) before building the loader (plans are then broadcast from "
                "rank 0 and checked on every rank), or pass plan_sync='none' if every rank is guaranteed the same "
                "dataset, seed and order (then nothing is checked)"
            )
        return "broadcast"
    if mode != "none" and not dist_ready():
        raise ValueError(f"plan_sync={mode!r} needs an initialised torch.distributed process group; use plan_sync='none'")
    return mode


def default_timeout() -> timedelta | None:
    """Collective timeout of the default process group (``init_process_group(timeout=...)``), if readable."""
    return group_timeout(None)


def group_timeout_s(group: Any) -> float | None:
    """Collective timeout of ``group`` in seconds (``None`` when torch does not expose it)."""
    if group is None:
        return None
    timeout = group_timeout(group)
    return timeout.total_seconds() if timeout is not None else None


def plan_group(sync: str, process_group: Any, timeout_s: float | None = None) -> Any:
    """A dedicated gloo group for plan exchange (created collectively: every rank builds the sampler).

    Its collectives wait at most ``timeout_s`` seconds for a peer, default the default
    group's timeout, so a rank that fails or stops is noticed within the job's own limit
    (torch's default for a new group would be 30 minutes whatever the job asked for).
    """
    if sync == "none":
        return None
    import torch.distributed as dist

    if process_group is not None:
        if timeout_s is not None:
            raise ValueError(
                f"sync_timeout_s={timeout_s} applies to the group the loader creates; with process_group=... the "
                "exchange waits as long as that group's own timeout (set it in dist.new_group(timeout=...))"
            )
        if dist.get_world_size(process_group) != dist.get_world_size():
            raise ValueError(
                f"process_group has {dist.get_world_size(process_group)} ranks but plans are exchanged among all "
                f"{dist.get_world_size()}; pass a group of every rank (or none: a gloo group is created)"
            )
        return process_group
    timeout = timedelta(seconds=timeout_s) if timeout_s is not None else default_timeout()
    return dist.new_group(backend="gloo", timeout=timeout)


def check_world(plan: StepPlan, world_size: int) -> None:
    if plan.num_ranks != world_size:
        raise ValueError(
            f"plan for step {plan.step} covers {plan.num_ranks} ranks but the sampler runs on {world_size}; "
            "build the balancer's ClusterSpec with num_ranks=world_size"
        )
