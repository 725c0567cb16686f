"""Both balancer stages on one strategy, and the planner's knobs.

:func:`solve_strategy` is the fast path for one candidate: stage 1 (:mod:`balancer.stage1`,
sequences → replicas) then stage 2 (:mod:`balancer.microbatch`, each replica's share →
micro-batches). The :class:`~balancer.selector.Balancer` runs it for every candidate and
keeps the fastest; candidate scoring (:mod:`balancer.pool`) runs it on sampled batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .microbatch import MicroBatches, pack_micro_batches
from .stage1 import Dispatch, ReplicaTable, dispatch, stage1_arrays

__all__ = ["BalancerConfig", "StrategySolution", "solve_strategy", "stage2"]

_REFINE_CHOICES = ("none", "cpsat")


@dataclass(kw_only=True)
class BalancerConfig:
    """Knobs of the per-step planner. Times in seconds."""

    refine: str = "none"
    """``"none"`` (greedy only) or ``"cpsat"`` (CP-SAT refinement of the chosen plan's stage 1)."""
    refine_time_limit: float = 0.05
    """CP-SAT solve budget per step: wall seconds, or CP-SAT deterministic units (about a
    second each; ~1.7 wall seconds on a 2-core CI machine) when ``deterministic``."""
    refine_min_gap: float = 1e-3
    """Skip CP-SAT when the greedy estimate is within this relative gap of the lower bound."""
    refine_max_variables: int = 200_000
    """Skip CP-SAT when sequences × replicas exceeds this (model building would dominate the step)."""
    switch_penalty: float = 0.0
    """Added to every candidate's estimate other than the previous step's strategy, in the
    cost model's time unit (seconds unless the model says otherwise)."""
    seed: int = 0
    """Seed of the CP-SAT search (combined with the step number)."""
    deterministic: bool = True
    """CP-SAT with one worker, a fixed seed and a deterministic-time budget, so every rank
    derives the same plan."""
    cpsat_workers: int = 1
    """CP-SAT worker threads when ``deterministic`` is off."""
    local_search: bool = True
    """Run the local search after LPT in stage 1."""
    local_search_rounds: int | None = 128
    """Most local-search rounds per candidate (each lowers the bottleneck replica; ``None``:
    the packer's default ``4·(n + m)``). 128 keeps nearly all of the gain on 64–1,024 GPUs
    while bounding the cost on steps with thousands of sequences."""
    max_extra_micro_batches: int = 8
    """Pipeline replicas: try at most this many micro-batch counts above the minimum."""
    balance_micro_batches: bool = False
    """``pp = 1``: re-pack the fewest micro-batches to equal times (estimate unchanged)."""
    speed_ewma: float = 0.3
    """Weight of a new speed sample in the per-rank EWMA, in (0, 1]."""
    speed_hysteresis: float = 0.05
    """Relative change of a rank's EWMA speed needed before planning uses it."""
    min_speed: float = 0.05
    """Smallest relative speed a rank can be assigned (guards against broken measurements)."""
    max_speed: float = 20.0
    """Largest relative speed a rank can be assigned."""
    lookahead_steps: int = 0
    """Bounded look-ahead (opt-in): the loader regroups every ``lookahead_steps`` consecutive
    global batches so that their total estimated time is lowest (:mod:`balancer.lookahead`);
    no sequence moves by more than ``lookahead_steps − 1`` steps. 0 or 1: off."""
    lookahead_epsilon: float = 0.1
    """Look-ahead token band: every regrouped step trains between ``(1 − ε)`` and ``(1 + ε)`` ×
    the loader's ``tokens_per_step`` tokens."""

    def __post_init__(self) -> None:
        if self.refine not in _REFINE_CHOICES:
            raise ValueError(f"BalancerConfig: refine={self.refine!r}; choose one of {list(_REFINE_CHOICES)}")
        for name in ("refine_time_limit", "speed_ewma", "min_speed", "max_speed"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"BalancerConfig: {name}={v!r} must be a positive number")
        for name in ("refine_min_gap", "switch_penalty", "speed_hysteresis"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"BalancerConfig: {name}={v!r} must be a number >= 0")
        if self.speed_ewma > 1:
            raise ValueError(f"BalancerConfig: speed_ewma={self.speed_ewma} must be in (0, 1] (e.g. 0.3)")
        if self.min_speed >= self.max_speed:
            raise ValueError(f"BalancerConfig: min_speed={self.min_speed} must be below max_speed={self.max_speed}")
        if self.local_search_rounds is not None and (
            isinstance(self.local_search_rounds, bool) or not isinstance(self.local_search_rounds, int) or self.local_search_rounds < 1
        ):
            raise ValueError(f"BalancerConfig: local_search_rounds={self.local_search_rounds!r} must be a positive integer or None")
        for name in ("seed", "max_extra_micro_batches", "refine_max_variables", "lookahead_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"BalancerConfig: {name}={v!r} must be an integer >= 0")
        eps = self.lookahead_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 <= eps < 1.0):
            raise ValueError(
                f"BalancerConfig: lookahead_epsilon={eps!r} must be a number in [0, 1) (the token band, e.g. 0.1 for ±10%)"
            )
        if isinstance(self.cpsat_workers, bool) or not isinstance(self.cpsat_workers, int) or self.cpsat_workers < 1:
            raise ValueError(f"BalancerConfig: cpsat_workers={self.cpsat_workers!r} must be an integer >= 1")
        if self.deterministic and self.cpsat_workers != 1:
            raise ValueError(
                f"BalancerConfig: cpsat_workers={self.cpsat_workers} with deterministic=True; "
                "deterministic plans need one CP-SAT worker (set deterministic=False to use more)"
            )


@dataclass(frozen=True, eq=False)
class StrategySolution:
    """Both stages of one strategy on one batch (positions are batch positions)."""

    table: ReplicaTable
    dispatch: Dispatch
    micro: MicroBatches
    stage1_times: np.ndarray
    """float64[n, K], the anticipated stage-1 times (kept for refinement)."""
    item_seconds: np.ndarray
    """float64[n, K], ``a·s² + b·s + d`` per type."""

    @property
    def est_step_seconds(self) -> float:
        return self.micro.step_seconds


def stage2(table: ReplicaTable, lengths: np.ndarray, t: np.ndarray, d: Dispatch, config: BalancerConfig) -> MicroBatches:
    t_item = t[np.arange(lengths.size), table.bin_type[d.bin_of]]
    return pack_micro_batches(
        table,
        d.bin_of,
        lengths,
        t_item,
        max_extra_micro_batches=config.max_extra_micro_batches,
        balance_times=config.balance_micro_batches,
    )


def solve_strategy(table: ReplicaTable, lengths: np.ndarray, config: BalancerConfig | None = None) -> StrategySolution:
    """Fast path of both stages for one strategy; ``lengths`` int64 tokens, all ``≤ table.max_capacity``."""
    config = config or BalancerConfig()
    t, w = stage1_arrays(table, lengths)
    d = dispatch(table, lengths, w, local_search=config.local_search, max_rounds=config.local_search_rounds)
    micro = stage2(table, lengths, t, d, config)
    return StrategySolution(table=table, dispatch=d, micro=micro, stage1_times=w, item_seconds=t)
