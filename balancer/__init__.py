"""The balancer: cost model, two-stage assignment, strategy selection and the StepPlan."""

from .analytic import AnalyticModel, AnalyticOptions
from .baselines import (
    BASELINES,
    BaselinePolicy,
    PlanScore,
    baseline_names,
    make_baseline,
    score_plan,
    static_layout,
    static_strategy,
)
from .cost import CostModel, LayoutCost, UnsupportedLayoutError, replica_seconds
from .dispatch import Dispatch, ReplicaTable, dispatch, item_seconds, lower_bound, refine_dispatch, stage1_times
from .fit import FitResult, fit_quadratic
from .microbatch import MicroBatches, pack_micro_batches, pack_replica
from .plan import PLAN_VERSION, PlanError, RankPlan, ReplicaPlan, StepPlan, validate
from .profile import LengthProfile
from .selector import Balancer, BalancerConfig, StrategySolution, solve_strategy
from .simulate import SimulationConfig, SimulationResult, simulate
from .specs import HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec, ModelSpec, hardware_preset, model_preset

__all__ = [
    "simulate",
    "SimulationResult",
    "SimulationConfig",
    "static_strategy",
    "static_layout",
    "score_plan",
    "make_baseline",
    "baseline_names",
    "PlanScore",
    "BaselinePolicy",
    "BASELINES",
    "AnalyticModel",
    "AnalyticOptions",
    "Balancer",
    "BalancerConfig",
    "CostModel",
    "Dispatch",
    "FitResult",
    "HARDWARE_PRESETS",
    "HardwareSpec",
    "LayoutCost",
    "LengthProfile",
    "MODEL_PRESETS",
    "MicroBatches",
    "ModelSpec",
    "PLAN_VERSION",
    "PlanError",
    "RankPlan",
    "ReplicaPlan",
    "ReplicaTable",
    "StepPlan",
    "StrategySolution",
    "UnsupportedLayoutError",
    "dispatch",
    "fit_quadratic",
    "hardware_preset",
    "item_seconds",
    "lower_bound",
    "model_preset",
    "pack_micro_batches",
    "pack_replica",
    "refine_dispatch",
    "replica_seconds",
    "solve_strategy",
    "stage1_times",
    "validate",
]
