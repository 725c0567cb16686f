"""Parallel layouts, strategies, the cluster spec, cp chunking, pipeline stages and the plan format.

This is the contract every other package shares: a :class:`Strategy` of replicas with a
:class:`Layout` each, and the :class:`StepPlan` that says which sequences every replica
runs in one step. It imports nothing of the project. The torch runtime lives in
``strategies.runtime`` and is not imported here, so ``import strategies`` stays free of
torch.
"""

from .context import chunk_bounds, cp_local_seqlens, cp_token_index
from .layout import GIB, ClusterSpec, Layout, Replica, Strategy
from .plan import (
    PLAN_VERSION,
    PlanError,
    RankPlan,
    ReplicaPlan,
    StepPlan,
    check_plan,
    length_of,
)
from .stages import lm_head_blocks, one_f_one_b, simulate_1f1b, split_stages, stage_costs, stage_imbalance

__all__ = [
    "GIB",
    "PLAN_VERSION",
    "ClusterSpec",
    "Layout",
    "PlanError",
    "RankPlan",
    "Replica",
    "ReplicaPlan",
    "StepPlan",
    "Strategy",
    "check_plan",
    "chunk_bounds",
    "cp_local_seqlens",
    "cp_token_index",
    "length_of",
    "lm_head_blocks",
    "one_f_one_b",
    "simulate_1f1b",
    "split_stages",
    "stage_costs",
    "stage_imbalance",
]

_MOVED_UP = {
    name: "balancer"
    for name in (
        "CandidateConfig",
        "CandidatePool",
        "LengthHistogram",
        "enumerate_layouts",
        "generate_candidates",
        "heterogeneous_mixes",
        "load_candidates",
        "save_candidates",
    )
}
"""Names that moved to the balancer (0.2). ``strategies`` may not import a higher floor,
so the old path cannot keep working; it says where the name went instead."""


def __getattr__(name: str) -> object:
    if name in _MOVED_UP:
        raise AttributeError(
            f"strategies.{name} moved to {_MOVED_UP[name]}.{name} (candidate pools are scored by the planner); "
            f"use `from {_MOVED_UP[name]} import {name}`"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
