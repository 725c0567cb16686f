"""Scoring and bounds shared by every policy, the simulator and the benchmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from strategies.layout import ClusterSpec, Layout, Strategy
from strategies.plan import StepPlan

from ..cost import CostModel, replica_seconds

__all__ = ["PlanScore", "score_plan", "strategy_lower_bound"]




@dataclass(frozen=True, slots=True)
class PlanScore:
    """A plan scored by the cost model (seconds; tokens)."""

    step_seconds: float
    """Slowest replica, seconds (padding included when the policy pads)."""
    replica_seconds: np.ndarray
    """Per-replica time, seconds, in plan order."""
    tokens: int
    """Real tokens in the step."""
    padding_tokens: int
    """Pad tokens added to make padded micro-batches rectangular (0 for packed policies)."""

    @property
    def imbalance(self) -> float:
        """Slowest over mean replica time (1.0 = perfect; 1.0 for an empty step)."""
        mean = float(self.replica_seconds.mean()) if self.replica_seconds.size else 0.0
        return self.step_seconds / mean if mean > 0 else 1.0

    @property
    def padding_ratio(self) -> float:
        """Pad tokens over all tokens processed."""
        total = self.tokens + self.padding_tokens
        return self.padding_tokens / total if total else 0.0


def _lengths_of(lengths: np.ndarray | Mapping[int, int], ids: Sequence[int]) -> np.ndarray:
    if isinstance(lengths, Mapping):
        return np.array([lengths[i] for i in ids], dtype=np.int64)
    return np.asarray(lengths, dtype=np.int64)[np.asarray(ids, dtype=np.int64)]


def score_plan(
    plan: StepPlan,
    lengths: np.ndarray | Mapping[int, int],
    cost_model: CostModel,
    cluster: ClusterSpec | None = None,
    *,
    padded: bool = False,
) -> PlanScore:
    """Score ``plan`` (``lengths`` maps sample id → tokens, as in :func:`~strategies.plan.validate`).

    Each sequence costs ``t(s) = a·s² + b·s + d`` (:meth:`~balancer.cost.LayoutCost.seconds`,
    per-sequence overhead included). With ``padded`` each micro-batch of ``v`` sequences
    costs ``v·t(s_max)`` instead of ``Σ t(s_i)`` (every padded row still a sequence: ``d``
    each) and adds ``v·s_max − Σ s_i`` pad tokens.
    """
    times = np.zeros(len(plan.replicas))
    tokens = pad = 0
    for j, rep in enumerate(plan.replicas):
        if not rep.sample_ids:
            continue
        cost = cost_model.cost(rep.layout)
        mb_times = []
        for mb in rep.micro_batches:
            s = _lengths_of(lengths, mb)
            tokens += int(s.sum())
            if padded and s.size:
                mb_times.append(float(s.size * cost.seconds(int(s.max()))))
                pad += int(s.size * s.max() - s.sum())
            else:
                mb_times.append(float(cost.seconds(s).sum()))
        speed = cluster.replica_speed(rep.replica) if cluster is not None else 1.0
        times[j] = replica_seconds(mb_times, cost.c, rep.layout.pp, speed)
    step = float(times.max()) if times.size else 0.0
    return PlanScore(step_seconds=step, replica_seconds=times, tokens=tokens, padding_tokens=pad)


def strategy_lower_bound(
    lengths: np.ndarray,
    strategy: Strategy,
    cost_model: CostModel,
    cluster: ClusterSpec | None = None,
) -> float:
    """A lower bound (seconds) on the step time of any plan of ``lengths`` on ``strategy``.

    ``t_j(s) = a·s² + b·s + d`` of replica ``j``'s layout (the per-sequence ``d`` is paid by
    every sequence wherever it runs, so it belongs to the work). The larger of (1) the
    longest single sequence: a replica holding sequence ``i`` runs at
    least ``pp`` micro-batches and ``pp·t(s_i)`` of it, so ``min_j pp_j·(t_j(s_i) + c_j) /
    speed_j``; and (2) the work bound: rank-seconds ``Σ_i min_j |j|·t_j(s_i)/speed_j`` plus
    the cheapest possible micro-batch overheads, spread over all ranks.
    """
    s = np.asarray(lengths, dtype=np.int64)
    if s.size == 0:
        return 0.0
    groups: dict[tuple[Layout, float], int] = {}
    for rep in strategy.replicas:
        speed = cluster.replica_speed(rep) if cluster is not None else 1.0
        groups[(rep.layout, speed)] = groups.get((rep.layout, speed), 0) + 1
    single = np.full(s.size, np.inf)
    work = np.full(s.size, np.inf)
    mb_overhead = np.inf
    mb_overhead_pp = np.inf
    largest_cap = 0
    for (lay, speed), _count in groups.items():
        cost = cost_model.cost(lay)
        t = np.where(s <= cost.token_capacity, cost.seconds(s), np.inf)
        single = np.minimum(single, lay.pp * (t + cost.c) / speed)
        work = np.minimum(work, lay.size * t / speed)
        mb_overhead = min(mb_overhead, lay.size * cost.c / speed)
        mb_overhead_pp = min(mb_overhead_pp, lay.size * lay.pp * cost.c / speed)
        largest_cap = max(largest_cap, cost.token_capacity)
    if not np.all(np.isfinite(single)):
        i = int(np.flatnonzero(~np.isfinite(single))[0])
        raise ValueError(
            f"sequence at position {i} has {int(s[i])} tokens, above the largest capacity {largest_cap} "
            f"of strategy {strategy.name!r}; cap lengths or use a larger layout"
        )
    min_micro_batches = math.ceil(int(s.sum()) / largest_cap)
    overhead = max(min_micro_batches * mb_overhead, mb_overhead_pp)
    return float(max(single.max(), (work.sum() + overhead) / strategy.num_ranks))
