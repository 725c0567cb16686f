"""Plan validation against a cost model: capacities and estimates recomputed.

:func:`strategies.plan.check_plan` checks what a plan is (ranks covered once, every
sample once, totals); :func:`validate` adds what only a cost model can say: every
micro-batch fits its layout's token capacity, each replica's ``est_seconds`` is what the
cost model gives, and the lower bound does not exceed the estimate.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from strategies.layout import ClusterSpec, Strategy
from strategies.plan import PlanError, StepPlan, check_plan, length_of

from .cost import CostModel

__all__ = ["check_loss_token_range", "validate"]


def validate(
    plan: StepPlan,
    lengths: np.ndarray | Sequence[int] | Mapping[int, int],
    *,
    sample_ids: Sequence[int] | np.ndarray | None = None,
    cost_model: CostModel | None = None,
    cluster: ClusterSpec | None = None,
    strategy: Strategy | None = None,
    rtol: float = 1e-9,
) -> None:
    """Check a plan's invariants; raise :class:`~strategies.plan.PlanError` naming the first broken one.

    The structural checks of :func:`~strategies.plan.check_plan`, and with a ``cost_model``:
    every micro-batch fits its layout's token capacity (so every sequence is eligible for
    its replica), each ``est_seconds`` is recomputable from the cost model and the
    cluster's speeds, ``est_step_seconds`` is their maximum, and
    ``lower_bound_seconds <= est_step_seconds``.
    """
    if not isinstance(lengths, Mapping):
        lengths = np.asarray(lengths)
    check_plan(plan, lengths, sample_ids=sample_ids, cluster=cluster, strategy=strategy)
    if cost_model is None:
        return
    worst = 0.0
    for j, rep in enumerate(plan.replicas):
        cost = cost_model.cost(rep.layout)
        mb_lengths = [np.array([length_of(lengths, i) for i in mb], dtype=np.int64) for mb in rep.micro_batches]
        for k, arr in enumerate(mb_lengths):
            if arr.sum() > cost.token_capacity:
                raise PlanError(
                    f"replica {j} ({rep.layout.name}) micro-batch {k} holds {int(arr.sum())} tokens, "
                    f"above the layout's capacity of {cost.token_capacity}"
                )
        speed = cluster.replica_speed(rep.replica) if cluster is not None else 1.0
        est = cost_model.replica_seconds(mb_lengths if rep.sample_ids else [], rep.layout, speed)
        if not math.isclose(est, rep.est_seconds, rel_tol=rtol, abs_tol=1e-12):
            raise PlanError(
                f"replica {j} ({rep.layout.name}) est_seconds={rep.est_seconds!r} but the cost model gives {est!r}"
            )
        worst = max(worst, est)
    if not math.isclose(worst, plan.est_step_seconds, rel_tol=rtol, abs_tol=1e-12):
        raise PlanError(f"est_step_seconds={plan.est_step_seconds!r} but the slowest replica takes {worst!r}")
    if plan.lower_bound_seconds > plan.est_step_seconds * (1 + rtol) + 1e-12:
        raise PlanError(
            f"lower_bound_seconds={plan.lower_bound_seconds!r} exceeds est_step_seconds={plan.est_step_seconds!r}"
        )


def check_loss_token_range(loss_tokens: np.ndarray, lengths: np.ndarray, sample_ids: np.ndarray | None = None) -> None:
    """Raise ``ValueError`` naming the first sequence whose loss-token count is outside ``0 .. length − 1``.

    The first token of a sequence carries no loss (nothing precedes it), so a sequence of
    ``s`` tokens has at most ``s − 1``. Arrays are ``int64[n]``; ``sample_ids`` name the
    sequences in the message (default: their positions).
    """
    bad = np.flatnonzero((loss_tokens < 0) | (loss_tokens > lengths - 1))
    if bad.size:
        i = int(bad[0])
        who = f"sample {int(sample_ids[i])}" if sample_ids is not None else f"sequence {i}"
        raise ValueError(
            f"{who}: loss_tokens={int(loss_tokens[i])} must be between 0 and its length minus one "
            f"({int(lengths[i]) - 1}): the first token of a sequence carries no loss"
        )
