"""Epoch bookkeeping: the order of an epoch, where its global batches begin and end, and
this rank's micro-batches of a planned batch.

The global batch sequence depends only on (piece lengths, seed, epoch, budget) — never
on the world size — so a run can resume on another number of ranks and continue the
epoch with no sample lost or repeated.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from strategies.plan import RankPlan

from .agreement import PlanBatch
from .pieces import Pieces
from .spec import MicroBatchSpec

__all__ = ["epoch_batches", "gather_batch", "micro_batch_specs", "token_budget_bounds"]


@njit(cache=True)
def token_budget_bounds(tokens: np.ndarray, budget: int) -> np.ndarray:
    """Batch boundaries: each batch takes samples in order until the next would exceed ``budget``."""
    n = tokens.size
    out = np.empty(n + 1, dtype=np.int64)
    out[0] = 0
    m = 0
    acc = 0
    for i in range(n):
        t = tokens[i]
        if acc > 0 and acc + t > budget:
            m += 1
            out[m] = i
            acc = 0
        acc += t
    if n > 0:
        m += 1
        out[m] = n
    return out[: m + 1]


def epoch_batches(
    kept: np.ndarray,
    sample_tokens: np.ndarray,
    epoch: int,
    *,
    seed: int,
    shuffle: bool,
    tokens_per_step: int | None,
    sequences_per_step: int | None,
    drop_last: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(order, bounds)`` of ``epoch``: sample ids in epoch order and batch boundaries into it.

    The order is a permutation of ``kept`` from ``(seed, epoch)`` (or ``kept`` itself
    without ``shuffle``); batches are runs of ``sequences_per_step`` samples, or as many
    samples as fit ``tokens_per_step`` tokens (``sample_tokens``, at least one sample).
    ``drop_last`` drops a partial final batch.
    """
    order = np.random.default_rng([seed, epoch]).permutation(kept) if shuffle else kept
    if sequences_per_step is not None:
        k = sequences_per_step
        bounds = np.append(np.arange(0, order.size, k, dtype=np.int64), order.size)
        partial = order.size % k != 0
    else:
        assert tokens_per_step is not None
        bounds = token_budget_bounds(sample_tokens[order], int(tokens_per_step))
        partial = True
    if drop_last and partial and bounds.size > 1:
        bounds = bounds[:-1]
    return order, bounds


def gather_batch(pieces: Pieces, samples: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, lengths, loss_tokens)`` of every piece of ``samples``: first pieces, then extra ones.

    Extra pieces have ids ``num_samples + k`` (``num_samples`` = the dataset's length).
    """
    p = pieces
    cnt = p.extra_offset[samples + 1] - p.extra_offset[samples]
    extra = np.repeat(p.extra_offset[samples], cnt) + (np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt))
    ids = np.concatenate([samples, num_samples + extra])
    lengths = np.concatenate([p.first_len[samples], p.extra_end[extra] - p.extra_start[extra]])
    loss = np.concatenate([p.first_loss[samples], p.extra_loss[extra]])
    return ids, lengths, loss


def micro_batch_specs(
    pieces: Pieces, lengths: np.ndarray, batch: PlanBatch, rank_plan: RankPlan, *, epoch: int, step_in_epoch: int
) -> tuple[MicroBatchSpec, ...]:
    """This rank's micro-batches of a planned ``batch``: which piece of which sample, and its loss tokens."""
    where = {int(pid): j for j, pid in enumerate(batch.ids.tolist())}
    n = lengths.size
    glt = int(batch.loss_tokens.sum())
    num = len(rank_plan.micro_batches)
    specs = []
    for k, mb in enumerate(rank_plan.micro_batches):
        sids, starts, ends, full, loss = [], [], [], [], []
        for pid in mb:
            j = where.get(pid)
            if j is None:
                raise ValueError(f"step {batch.step}: the plan names sequence {pid}, which is not in the batch")
            if pid < n:
                sid, s0, s1 = pid, 0, int(pieces.first_len[pid])
            else:
                e = pid - n
                sid, s0, s1 = int(pieces.extra_sample[e]), int(pieces.extra_start[e]), int(pieces.extra_end[e])
            sids.append(sid)
            starts.append(s0)
            ends.append(s1)
            full.append(int(lengths[sid]))
            loss.append(int(batch.loss_tokens[j]))
        specs.append(
            MicroBatchSpec(
                step=batch.step,
                epoch=epoch,
                step_in_epoch=step_in_epoch,
                index=k,
                num_micro_batches=num,
                sample_ids=tuple(sids),
                starts=tuple(starts),
                ends=tuple(ends),
                full_lengths=tuple(full),
                loss_tokens=tuple(loss),
                global_loss_tokens=glt,
                cp=rank_plan.layout.cp,
                cp_rank=rank_plan.cp_rank,
            )
        )
    return tuple(specs)
