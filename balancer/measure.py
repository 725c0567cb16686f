"""Measured plans: run a plan's micro-batches on the local device, replica after replica.

A cluster-sized plan cannot run on one device at once, but each replica of one rank
(layout ``tp1``) can run on it in turn: its micro-batches one after another, exactly as
that rank would. So one GPU measures what every replica of the plan takes, and with it the
plan's measured step time (the slowest replica), its measured imbalance (slowest over
mean) and how well the cost model's estimate matched each replica (``estimate /
measured``) — for the balancer's plans and every baseline's alike.

This module is torch-free: the caller hands in ``run(micro_batch) -> seconds``, the timer
of one micro-batch on the device (the ``hydraulis measure`` command builds it from the
packed decoder of :mod:`balancer.decoder`). Padded policies run their micro-batches as
padded rectangles (``v`` sequences of the longest length), as their scores assume.
A straggler's relative speed (``ClusterSpec.speed``) divides its replica's measured time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from strategies.layout import ClusterSpec
from strategies.plan import StepPlan

from .baselines import score_plan
from .cost import CostModel

__all__ = ["MeasuredPlan", "ReplicaMeasurement", "execute_plan", "summarize", "summary_table"]

MicroBatchTimer = Callable[[tuple[int, ...]], float]
"""Seconds one micro-batch (its sequence lengths) takes on the device, forward + backward."""


@dataclass(frozen=True, slots=True)
class ReplicaMeasurement:
    """One replica of a plan, estimated and measured (seconds; tokens)."""

    replica: int
    micro_batches: int
    sequences: int
    tokens: int
    """Tokens run, padding included for padded policies."""
    est_seconds: float
    measured_seconds: float

    @property
    def ratio(self) -> float:
        """``estimate / measured`` (nan for an idle replica)."""
        return self.est_seconds / self.measured_seconds if self.measured_seconds > 0 else float("nan")


@dataclass(frozen=True, slots=True)
class MeasuredPlan:
    """A plan run replica by replica: the measured step and its estimate."""

    policy: str
    step: int
    strategy: str
    replicas: tuple[ReplicaMeasurement, ...]

    @property
    def est_step_seconds(self) -> float:
        return max(r.est_seconds for r in self.replicas)

    @property
    def measured_step_seconds(self) -> float:
        """The slowest replica's measured time: the step time of the plan."""
        return max(r.measured_seconds for r in self.replicas)

    @property
    def measured_imbalance(self) -> float:
        """Slowest over mean measured replica time (1.0 = perfect)."""
        mean = float(np.mean([r.measured_seconds for r in self.replicas]))
        return self.measured_step_seconds / mean if mean > 0 else 1.0

    @property
    def est_imbalance(self) -> float:
        mean = float(np.mean([r.est_seconds for r in self.replicas]))
        return self.est_step_seconds / mean if mean > 0 else 1.0

    def ratios(self) -> np.ndarray:
        """``estimate / measured`` of every replica that ran something."""
        return np.array([r.ratio for r in self.replicas if r.measured_seconds > 0], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "step": self.step, "strategy": self.strategy,
            "est_step_seconds": self.est_step_seconds, "measured_step_seconds": self.measured_step_seconds,
            "est_imbalance": self.est_imbalance, "measured_imbalance": self.measured_imbalance,
            "replicas": [{**asdict(r), "ratio": r.ratio} for r in self.replicas],
        }


def _lengths_of(lengths: np.ndarray | Mapping[int, int], ids: Sequence[int]) -> list[int]:
    if isinstance(lengths, Mapping):
        return [int(lengths[i]) for i in ids]
    return [int(x) for x in np.asarray(lengths)[np.asarray(ids, dtype=np.int64)]]


def execute_plan(
    plan: StepPlan,
    lengths: np.ndarray | Mapping[int, int],
    cost_model: CostModel,
    run: MicroBatchTimer,
    *,
    policy: str = "",
    cluster: ClusterSpec | None = None,
    padded: bool = False,
) -> MeasuredPlan:
    """Run every micro-batch of ``plan`` with ``run`` and compare with the cost model.

    ``lengths`` maps sample id → tokens (as in :func:`~balancer.validation.validate`).
    Each replica's estimate is its cost-model score (:func:`~balancer.baselines.score_plan`,
    padded when ``padded``); its measured time is the sum of its micro-batches' times
    divided by its speed. Only replicas of one rank can run on one device: a plan with a
    larger layout raises ``ValueError``.
    """
    for j, rep in enumerate(plan.replicas):
        if rep.layout.size != 1:
            raise ValueError(
                f"replica {j} of plan {plan.strategy!r} has layout {rep.layout.name} ({rep.layout.size} ranks); "
                "measured plans run one-rank replicas (tp1) on this device — plan with a cost model that prices "
                "only tp1 (a calibration does) or use `hydraulis simulate` for estimates"
            )
    score = score_plan(plan, lengths, cost_model, cluster, padded=padded)
    out = []
    for j, rep in enumerate(plan.replicas):
        speed = cluster.replica_speed(rep.replica) if cluster is not None else 1.0
        seconds = 0.0
        tokens = sequences = mbs = 0
        for mb in rep.micro_batches:
            if not mb:
                continue
            s = _lengths_of(lengths, mb)
            if padded:
                s = [max(s)] * len(s)
            seconds += float(run(tuple(s)))
            tokens += sum(s)
            sequences += len(s)
            mbs += 1
        out.append(ReplicaMeasurement(j, mbs, sequences, tokens, float(score.replica_seconds[j]), seconds / speed))
    return MeasuredPlan(policy=policy, step=plan.step, strategy=plan.strategy, replicas=tuple(out))


def summarize(measured: Iterable[MeasuredPlan], reference: str = "balancer") -> dict[str, dict[str, float]]:
    """Per policy: mean estimated and measured step time, mean measured imbalance, the
    per-replica ``estimate / measured`` (median, min, max, median ``|ratio − 1|``) and the
    measured speedup of ``reference`` over it (``> 1``: the reference is faster)."""
    by: dict[str, list[MeasuredPlan]] = {}
    for m in measured:
        by.setdefault(m.policy, []).append(m)
    out: dict[str, dict[str, float]] = {}
    for name, plans in by.items():
        ratios = np.concatenate([p.ratios() for p in plans]) if plans else np.zeros(0)
        out[name] = {
            "steps": float(len(plans)),
            "est_step_seconds": float(np.mean([p.est_step_seconds for p in plans])),
            "measured_step_seconds": float(np.mean([p.measured_step_seconds for p in plans])),
            "measured_imbalance": float(np.mean([p.measured_imbalance for p in plans])),
            "est_imbalance": float(np.mean([p.est_imbalance for p in plans])),
            "ratio_median": float(np.median(ratios)) if ratios.size else float("nan"),
            "ratio_min": float(ratios.min()) if ratios.size else float("nan"),
            "ratio_max": float(ratios.max()) if ratios.size else float("nan"),
            "abs_error_median": float(np.median(np.abs(ratios - 1.0))) if ratios.size else float("nan"),
        }
    if reference in out:
        ref = out[reference]["measured_step_seconds"]
        for name, row in out.items():
            row["reference_speedup"] = row["measured_step_seconds"] / ref if ref > 0 else float("nan")
    return out


def summary_table(summary: Mapping[str, Mapping[str, float]], reference: str = "balancer") -> str:
    """Markdown: one row per policy (times in seconds)."""
    head = (
        "| policy | est. step s | measured step s | measured imbalance | est./measured per replica "
        f"(median [min–max]) | median abs. error | {reference} speedup (measured) |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, r in summary.items():
        up = "—" if name == reference or "reference_speedup" not in r else f"{r['reference_speedup']:.2f}×"
        rows.append(
            f"| {name} | {r['est_step_seconds']:.4g} | {r['measured_step_seconds']:.4g} | "
            f"{r['measured_imbalance']:.3f} | {r['ratio_median']:.3f} [{r['ratio_min']:.3f}–{r['ratio_max']:.3f}] | "
            f"{100 * r['abs_error_median']:.1f}% | {up} |"
        )
    return head + "\n".join(rows) + "\n"
