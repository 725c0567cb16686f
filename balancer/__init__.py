"""The balancer: cost model, two-stage assignment, strategy selection, candidate pools, baselines.

Floor 3 of the project: it imports ``packers`` and ``strategies`` (the plan format lives in
``strategies.plan``), never the loader, the runtime or the CLI. Public names are imported
lazily so that ``hydraulis --help`` and light users (plan JSON, profiles) do not pay for
numba and OR-tools start-up.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

# Public name -> submodule.
_EXPORTS: dict[str, str] = {
    "AnalyticModel": "analytic",
    "AnalyticOptions": "analytic_options",
    "BASELINES": "baselines",
    "BaselinePolicy": "baselines",
    "PlanScore": "baselines",
    "baseline_names": "baselines",
    "make_baseline": "baselines",
    "score_plan": "baselines",
    "static_layout": "baselines",
    "static_strategy": "baselines",
    "CandidateConfig": "candidates",
    "cluster_lower_bound": "candidates",
    "enumerate_layouts": "candidates",
    "heterogeneous_mixes": "candidates",
    "COST_MODEL_VERSION": "cost",
    "CostModel": "cost",
    "CalibrationWarning": "calibrate",
    "calibration_micro_batches": "calibrate",
    "build_decoder": "decoder",
    "MeasuredPlan": "measure",
    "ReplicaMeasurement": "measure",
    "execute_plan": "measure",
    "Dispatch": "stage1",
    "ReplicaTable": "stage1",
    "dispatch": "stage1",
    "item_seconds": "stage1",
    "lower_bound": "bounds",
    "refine_dispatch": "stage1",
    "stage1_times": "stage1",
    "FitResult": "fit",
    "fit_quadratic": "fit",
    "LengthHistogram": "histogram",
    "LayoutCost": "layout_cost",
    "UnsupportedLayoutError": "layout_cost",
    "replica_seconds": "layout_cost",
    "MicroBatches": "microbatch",
    "pack_micro_batches": "microbatch",
    "pack_replica": "microbatch",
    "CandidatePool": "pool",
    "generate_candidates": "pool",
    "load_candidates": "pool",
    "save_candidates": "pool",
    "LengthProfile": "profile",
    "Balancer": "selector",
    "LOCKSTEP_ORDERS": "lockstep",
    "LockstepPrice": "lockstep",
    "free_step_seconds": "lockstep",
    "lockstep_price": "lockstep",
    "lockstep_step_seconds": "lockstep",
    "longest_first": "lockstep",
    "WindowPlan": "lookahead",
    "WindowPlanner": "lookahead",
    "BalancerConfig": "solve",
    "StrategySolution": "solve",
    "solve_strategy": "solve",
    "SimulationConfig": "simulation",
    "SimulationResult": "simulation",
    "simulate": "simulation",
    "HARDWARE_PRESETS": "specs",
    "HardwareSpec": "specs",
    "MODEL_PRESETS": "specs",
    "ModelSpec": "specs",
    "hardware_preset": "specs",
    "model_preset": "specs",
    "validate": "validation",
}

_MOVED: dict[str, str] = {
    name: "strategies.plan" for name in ("PLAN_VERSION", "PlanError", "RankPlan", "ReplicaPlan", "StepPlan")
}
"""Names that moved to a lower floor (0.2): still importable from here with a DeprecationWarning."""

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - static analysers see the eager imports
    from .analytic import AnalyticModel
    from .analytic_options import AnalyticOptions
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
    from .bounds import lower_bound
    from .calibrate import CalibrationWarning, calibration_micro_batches
    from .candidates import CandidateConfig, cluster_lower_bound, enumerate_layouts, heterogeneous_mixes
    from .cost import COST_MODEL_VERSION, CostModel
    from .decoder import build_decoder
    from .fit import FitResult, fit_quadratic
    from .histogram import LengthHistogram
    from .layout_cost import LayoutCost, UnsupportedLayoutError, replica_seconds
    from .lockstep import (
        LOCKSTEP_ORDERS,
        LockstepPrice,
        free_step_seconds,
        lockstep_price,
        lockstep_step_seconds,
        longest_first,
    )
    from .lookahead import WindowPlan, WindowPlanner
    from .measure import MeasuredPlan, ReplicaMeasurement, execute_plan
    from .microbatch import MicroBatches, pack_micro_batches, pack_replica
    from .pool import CandidatePool, generate_candidates, load_candidates, save_candidates
    from .profile import LengthProfile
    from .selector import Balancer
    from .simulation import SimulationConfig, SimulationResult, simulate
    from .solve import BalancerConfig, StrategySolution, solve_strategy
    from .specs import HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec, ModelSpec, hardware_preset, model_preset
    from .stage1 import Dispatch, ReplicaTable, dispatch, item_seconds, refine_dispatch, stage1_times
    from .validation import validate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    moved = _MOVED.get(name)
    if moved is not None:
        warnings.warn(
            f"balancer.{name} moved to {moved}.{name}; import it from there (the old path goes in 0.3)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(moved), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
