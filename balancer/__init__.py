"""The balancer: cost model, two-stage assignment, strategy selection and the StepPlan."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> submodule. Imported lazily so that `hydraulis --help` and light users
# (plan JSON, profiles) do not pay for numba and OR-tools start-up.
_EXPORTS: dict[str, str] = {
    "AnalyticModel": "analytic",
    "AnalyticOptions": "analytic",
    "BASELINES": "baselines",
    "BaselinePolicy": "baselines",
    "PlanScore": "baselines",
    "baseline_names": "baselines",
    "make_baseline": "baselines",
    "score_plan": "baselines",
    "static_layout": "baselines",
    "static_strategy": "baselines",
    "CostModel": "cost",
    "LayoutCost": "cost",
    "UnsupportedLayoutError": "cost",
    "replica_seconds": "cost",
    "Dispatch": "dispatch",
    "ReplicaTable": "dispatch",
    "dispatch": "dispatch",
    "item_seconds": "dispatch",
    "lower_bound": "dispatch",
    "refine_dispatch": "dispatch",
    "stage1_times": "dispatch",
    "FitResult": "fit",
    "fit_quadratic": "fit",
    "MicroBatches": "microbatch",
    "pack_micro_batches": "microbatch",
    "pack_replica": "microbatch",
    "PLAN_VERSION": "plan",
    "PlanError": "plan",
    "RankPlan": "plan",
    "ReplicaPlan": "plan",
    "StepPlan": "plan",
    "validate": "plan",
    "LengthProfile": "profile",
    "Balancer": "selector",
    "BalancerConfig": "selector",
    "StrategySolution": "selector",
    "solve_strategy": "selector",
    "SimulationConfig": "simulate",
    "SimulationResult": "simulate",
    "simulate": "simulate",
    "HARDWARE_PRESETS": "specs",
    "HardwareSpec": "specs",
    "MODEL_PRESETS": "specs",
    "ModelSpec": "specs",
    "hardware_preset": "specs",
    "model_preset": "specs",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - static analysers see the eager imports
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
