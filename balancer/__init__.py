"""The balancer: cost model, two-stage assignment, strategy selection and the StepPlan."""

from .cost import CostModel, LayoutCost, replica_seconds
from .plan import PLAN_VERSION, PlanError, RankPlan, ReplicaPlan, StepPlan, validate

__all__ = [
    "CostModel",
    "LayoutCost",
    "PLAN_VERSION",
    "PlanError",
    "RankPlan",
    "ReplicaPlan",
    "StepPlan",
    "replica_seconds",
    "validate",
]
