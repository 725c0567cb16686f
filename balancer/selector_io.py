"""What goes into and comes out of one step's planning in :class:`balancer.selector.Balancer`.

* :func:`check_batch` — a step's ``lengths`` (tokens), ``sample_ids`` and ``loss_tokens`` as
  ``int64`` arrays, checked entry by entry (whole numbers, in range, ``>= 1`` token, unique
  ids, loss tokens within the sequence); each error names the offending entry;
* :func:`assemble_plan` — the chosen :class:`~balancer.solve.StrategySolution` written out as
  a :class:`~strategies.plan.StepPlan`: sample ids per micro-batch per replica, the replica
  estimates and the step's lower bound (seconds).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.plan import ReplicaPlan, StepPlan

from .solve import StrategySolution
from .validation import check_loss_token_range

__all__ = ["assemble_plan", "check_batch"]


def _int_array(values: Any, what: str, n: int | None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise ValueError(f"{what} has {arr.size} entries but the batch has {n} sequences; give one per sequence")
    if arr.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ValueError(f"{what}[{int(bad[0])}] is {arr[bad[0]]}; values must be finite integers")
        frac = np.flatnonzero(arr != np.round(arr))
        if frac.size:
            raise ValueError(f"{what}[{int(frac[0])}] = {arr[frac[0]]} is not a whole number")
    elif arr.dtype.kind not in "iu" and arr.size:
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind in "fu":  # values int64 cannot hold would wrap round, not fail
        huge = np.flatnonzero(np.abs(arr) >= _INT64_LIMIT if arr.dtype.kind == "f" else arr >= _INT64_LIMIT)
        if huge.size:
            raise ValueError(f"{what}[{int(huge[0])}] = {arr[huge[0]]} is out of range (at most {_INT64_LIMIT - 1:.3e})")
    return arr.astype(np.int64)


_INT64_LIMIT = 2**63


def check_batch(lengths_in: Any, sample_ids_in: Any, loss_in: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(lengths, sample_ids, loss_tokens)`` of one step as int64 arrays, checked (raises naming the entry)."""
    lengths = _int_array(lengths_in, "lengths", None)
    n = lengths.size
    if n == 0:
        raise ValueError("lengths is empty: a step needs at least one sequence")
    bad = np.flatnonzero(lengths <= 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"lengths[{i}] = {int(lengths[i])}; every sequence must have at least 1 token")
    if sample_ids_in is None:
        sample_ids = np.arange(n, dtype=np.int64)
    else:
        sample_ids = _int_array(sample_ids_in, "sample_ids", n)
        neg = np.flatnonzero(sample_ids < 0)
        if neg.size:
            raise ValueError(f"sample_ids[{int(neg[0])}] = {int(sample_ids[neg[0]])}; sample ids are dataset indices >= 0")
        uniq, counts = np.unique(sample_ids, return_counts=True)
        if uniq.size != n:
            dup = int(uniq[np.argmax(counts > 1)])
            raise ValueError(f"sample id {dup} appears more than once in the batch; each sample must appear once")
    if loss_in is None:
        loss = lengths - 1
    else:
        loss = _int_array(loss_in, "loss_tokens", n)
        check_loss_token_range(loss, lengths, sample_ids)
    return lengths, sample_ids, loss


def assemble_plan(
    sol: StrategySolution,
    lengths: np.ndarray,
    sample_ids: np.ndarray,
    loss: np.ndarray,
    bound: float,
    step: int,
    solver: str,
    elapsed: float,
) -> StepPlan:
    """The :class:`StepPlan` of solution ``sol`` (sample ids in micro-batch order, estimates per replica)."""
    table, micro = sol.table, sol.micro
    order, bounds_arr = micro.flat_order()
    ids = sample_ids[order].tolist()
    bounds = bounds_arr.tolist()
    mb_start = micro.mb_start.tolist()
    count = np.bincount(micro.bin_of, minlength=table.num_replicas).tolist()
    # est_seconds: balancer.cost.replica_seconds, vectorised over replicas in pack_micro_batches.
    est = micro.est_seconds.tolist()
    replicas: list[ReplicaPlan] = []
    for j, rep in enumerate(table.strategy.replicas):
        if count[j] == 0:
            replicas.append(ReplicaPlan(rep.ranks, rep.layout, ((),), 0.0))
            continue
        mbs = tuple(tuple(ids[bounds[k] : bounds[k + 1]]) for k in range(mb_start[j], mb_start[j + 1]))
        replicas.append(ReplicaPlan(rep.ranks, rep.layout, mbs, est[j]))
    est_step = max(r.est_seconds for r in replicas)
    assert bound <= est_step * (1 + 1e-9) + 1e-12, f"lower bound {bound} above estimate {est_step}"
    return StepPlan(
        step=step,
        strategy=table.strategy.name,
        replicas=tuple(replicas),
        est_step_seconds=est_step,
        lower_bound_seconds=min(bound, est_step),
        global_sequences=int(lengths.size),
        global_tokens=int(lengths.sum()),
        global_loss_tokens=int(loss.sum()),
        solver=solver,
        plan_seconds=elapsed,
    )
