"""The policy base class and the micro-batch helpers the policies share (positions index the step's arrays)."""

from __future__ import annotations

import heapq
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from numba import njit

from packers.binpack import first_fit_decreasing
from packers.types import group_by_bin
from strategies.layout import ClusterSpec, Strategy
from strategies.plan import ReplicaPlan, StepPlan

from ..cost import CostModel, replica_seconds
from ..validation import check_loss_token_range
from .scoring import PlanScore, score_plan, strategy_lower_bound
from .static import _priced

__all__ = ["Assignment", "BaselinePolicy"]


@njit(cache=True)
def _least_loaded(order, work, sizes, num_bins, capacity):  # pragma: no cover - numba
    # Each item in ``order`` goes to the bin with the least work whose tokens stay within
    # ``capacity``; returns bin_of with -1 for an item that fits nowhere.
    load = np.zeros(num_bins)
    tokens = np.zeros(num_bins, dtype=np.int64)
    bin_of = np.full(work.shape[0], -1, dtype=np.int64)
    for i in order:
        best = np.inf
        bj = -1
        for j in range(num_bins):
            if tokens[j] + sizes[i] <= capacity and load[j] < best:
                best = load[j]
                bj = j
        if bj < 0:
            return bin_of
        load[bj] += work[i]
        tokens[bj] += sizes[i]
        bin_of[i] = bj
    return bin_of

# ----------------------------------------------------------------------------------------
# Micro-batch helpers (positions index the step's arrays)
# ----------------------------------------------------------------------------------------


def _split_largest(mbs: list[np.ndarray], lengths: np.ndarray, target: int) -> list[np.ndarray]:
    """Split micro-batches until there are ``target`` of them, then pad with empty ones.

    The split one is the micro-batch with the most tokens among those with >= 2 sequences;
    its sequences are dealt longest first to the lighter half, so both halves stay under
    the original token count (and therefore under the capacity).
    """
    mbs = [m for m in mbs if m.size]
    if len(mbs) >= target:
        return mbs
    heap = [(-int(lengths[m].sum()), k) for k, m in enumerate(mbs) if m.size >= 2]
    heapq.heapify(heap)
    while len(mbs) < target and heap:
        _, k = heapq.heappop(heap)
        m = mbs[k]
        halves: list[list[int]] = [[], []]
        tok = [0, 0]
        for p in m[np.argsort(-lengths[m], kind="stable")]:
            h = 0 if tok[0] <= tok[1] else 1
            halves[h].append(int(p))
            tok[h] += int(lengths[p])
        mbs[k] = np.array(halves[0], dtype=np.int64)
        mbs.append(np.array(halves[1], dtype=np.int64))
        for q, h in ((k, halves[0]), (len(mbs) - 1, halves[1])):
            if len(h) >= 2:
                heapq.heappush(heap, (-int(lengths[mbs[q]].sum()), q))
    while mbs and len(mbs) < target:
        mbs.append(np.zeros(0, dtype=np.int64))
    return mbs


def _pack_tokens(positions: np.ndarray, lengths: np.ndarray, capacity: int, pp: int) -> list[np.ndarray]:
    """First-fit-decreasing by tokens into micro-batches of ``capacity``; at least ``pp`` of them."""
    if positions.size == 0:
        return []
    packing = first_fit_decreasing(lengths[positions], capacity)
    mbs = [positions[g] for g in group_by_bin(np.asarray(packing.bin_of), int(packing.num_bins))]
    return _split_largest(mbs, lengths, pp)


def _deal(bins: list[np.ndarray], num_replicas: int) -> list[list[np.ndarray]]:
    """Bin ``b`` → replica ``b mod R`` (one bin per replica per micro-step)."""
    out: list[list[np.ndarray]] = [[] for _ in range(num_replicas)]
    for b, m in enumerate(bins):
        out[b % num_replicas].append(m)
    return out

# ----------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------

Assignment = list[list[np.ndarray]]
"""Per replica, its micro-batches as arrays of positions into the step's arrays."""


class BaselinePolicy(ABC):
    """Base of the named policies: validation, plan assembly, scoring.

    Subclasses implement ``_assign(lengths, rng) -> (strategy, assignment)``; the
    ``strategy`` is the fixed one except for ``megatron_hybrid_cp``, which splits the
    static layout's cp groups per step.
    """

    name: ClassVar[str] = "baseline"
    pads: ClassVar[bool] = False
    """Whether micro-batches run padded (scored with :func:`score_plan` ``padded=True``)."""
    system: ClassVar[str] = ""
    """The real system this policy reproduces (name, version or commit)."""
    fidelity: ClassVar[str] = ""
    """How closely, as measured against the peer fixtures (``tests/fixtures/baselines``)."""

    def __init__(
        self,
        cluster: ClusterSpec,
        strategy: Strategy,
        cost_model: CostModel,
        *,
        seed: int = 0,
        max_length: int | None = None,
        tokens_per_step: int | None = None,
    ) -> None:
        strategy.check_cluster(cluster)
        for lay in set(strategy.layouts):
            if not _priced(cost_model, lay):
                raise ValueError(f"baseline {self.name!r}: the cost model cannot price layout {lay.name}")
        self.cluster = cluster
        self.strategy = strategy
        self.cost_model = cost_model
        self.seed = int(seed)
        self.capacity = min(cost_model.token_capacity(lay) for lay in strategy.layouts)
        """Tokens per micro-batch every replica accepts (the smallest capacity)."""
        self.max_length = int(max_length) if max_length is not None else self.capacity
        """Longest sequence this policy accepts, tokens."""
        if not 1 <= self.max_length <= self.capacity:
            raise ValueError(
                f"baseline {self.name!r}: max_length={self.max_length} must lie in 1..{self.capacity}, "
                f"the token capacity of strategy {strategy.name!r}; use a larger layout or cap lengths"
            )
        if tokens_per_step is not None and int(tokens_per_step) < 1:
            raise ValueError(f"baseline {self.name!r}: tokens_per_step={tokens_per_step} must be >= 1 token or None")
        self.tokens_per_step = None if tokens_per_step is None else int(tokens_per_step)
        """The step's token budget (only a policy that delays sequences, ``wlb_llm``, uses
        it to fill steps; ``None`` = each incoming batch's tokens)."""
        self._speeds = [cluster.replica_speed(rep) for rep in strategy.replicas]

    # -- public ---------------------------------------------------------------------------
    def plan(
        self,
        lengths: np.ndarray | Sequence[int],
        *,
        step: int = 0,
        sample_ids: np.ndarray | Sequence[int] | None = None,
        loss_tokens: np.ndarray | Sequence[int] | None = None,
        flush: bool = False,
    ) -> StepPlan:
        """Plan one step. ``lengths[i]`` (tokens) belongs to ``sample_ids[i]`` (default ``i``).

        ``loss_tokens`` defaults to ``lengths − 1``. ``flush`` ends an epoch: a policy with
        a carry-over queue (``wlb_llm``) empties it into this step.
        """
        t0 = time.perf_counter()
        s, ids, loss = self._check(lengths, sample_ids, loss_tokens)
        s, ids, loss = self._admit(s, ids, loss, flush)
        rng = np.random.default_rng([self.seed, int(step)])
        strategy, assignment = self._assign(s, rng) if s.size else (self.strategy, [[] for _ in self.strategy.replicas])
        return self._build(int(step), strategy, assignment, s, ids, loss, t0)

    def score(self, plan: StepPlan, lengths: np.ndarray | Mapping[int, int]) -> PlanScore:
        """The plan's time under this policy's execution model (padding included if it pads)."""
        return score_plan(plan, lengths, self.cost_model, self.cluster, padded=self.pads)

    @property
    def pending(self) -> int:
        """Sequences held back for a later step (only ``wlb_llm`` holds any)."""
        return int(self.held().size)

    def held(self) -> np.ndarray:
        """Sample ids held back for a later step (int64; empty for a policy that holds none)."""
        return np.zeros(0, dtype=np.int64)

    def epoch_order(self, lengths: np.ndarray, permutation: np.ndarray, tokens_per_step: int) -> np.ndarray:
        """The order in which this system's sampler visits one epoch.

        ``lengths``: every dataset sample (tokens); ``permutation``: the epoch's random
        shuffle. Most systems train the shuffle as it is; one whose sampler groups
        sequences (``length_grouped``) returns its own order, and the simulator cuts that
        policy's steps from it.
        """
        return permutation

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strategy={self.strategy.name!r}, seed={self.seed})"

    # -- hooks ----------------------------------------------------------------------------
    def _admit(
        self, lengths: np.ndarray, ids: np.ndarray, loss: np.ndarray, flush: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return lengths, ids, loss

    @abstractmethod
    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        """This step's strategy and, per replica, its micro-batches (positions into ``lengths``)."""

    # -- internals ------------------------------------------------------------------------
    def _check(
        self, lengths: Any, sample_ids: Any, loss_tokens: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = np.asarray(lengths, dtype=np.int64).ravel()
        ids = np.arange(s.size, dtype=np.int64) if sample_ids is None else np.asarray(sample_ids, dtype=np.int64).ravel()
        loss = s - 1 if loss_tokens is None else np.asarray(loss_tokens, dtype=np.int64).ravel()
        if ids.size != s.size or loss.size != s.size:
            raise ValueError(
                f"lengths has {s.size} entries but sample_ids has {ids.size} and loss_tokens {loss.size}; "
                "give one per sequence"
            )
        if s.size and s.min() < 1:
            i = int(np.argmin(s))
            raise ValueError(f"sample {int(ids[i])} has length {int(s[i])}; lengths must be >= 1 token")
        check_loss_token_range(loss, s, ids)
        if s.size and s.max() > self.max_length:
            i = int(np.argmax(s))
            raise ValueError(
                f"sample {int(ids[i])} has {int(s[i])} tokens, above max_length {self.max_length} of "
                f"baseline {self.name!r} on {self.strategy.name!r}; cap lengths before planning"
            )
        return s, ids, loss

    def _build(
        self,
        step: int,
        strategy: Strategy,
        assignment: Assignment,
        lengths: np.ndarray,
        ids: np.ndarray,
        loss: np.ndarray,
        t0: float,
    ) -> StepPlan:
        replicas = []
        for rep, mbs in zip(strategy.replicas, assignment):
            if not any(m.size for m in mbs):
                replicas.append(ReplicaPlan(rep.ranks, rep.layout, ((),), 0.0))
                continue
            cost = self.cost_model.cost(rep.layout)
            mb_times = [float(cost.seconds(lengths[m]).sum()) for m in mbs]
            speed = self.cluster.replica_speed(rep)
            est = replica_seconds(mb_times, cost.c, rep.layout.pp, speed)
            replicas.append(ReplicaPlan(rep.ranks, rep.layout, tuple(tuple(ids[m].tolist()) for m in mbs), est))
        placed = sum(m.size for mbs in assignment for m in mbs)
        assert placed == lengths.size, f"{self.name}: placed {placed} of {lengths.size} sequences"
        bound = strategy_lower_bound(lengths, strategy, self.cost_model, self.cluster)
        return StepPlan(
            step=step,
            strategy=strategy.name,
            replicas=tuple(replicas),
            est_step_seconds=max((r.est_seconds for r in replicas), default=0.0),
            lower_bound_seconds=bound,
            global_sequences=int(lengths.size),
            global_tokens=int(lengths.sum()),
            global_loss_tokens=int(loss.sum()),
            solver=f"baseline:{self.name}",
            plan_seconds=time.perf_counter() - t0,
        )


def _micro_batch_size(policy: BaselinePolicy, micro_batch_size: int | None) -> int:
    """Sequences per padded micro-batch: default the most max-length rows the capacity holds."""
    mbs = policy.capacity // policy.max_length if micro_batch_size is None else int(micro_batch_size)
    mbs = max(1, mbs)
    if mbs * policy.max_length > policy.capacity:
        raise ValueError(
            f"baseline {policy.name!r}: micro_batch_size={mbs} rows padded to max_length {policy.max_length} "
            f"need {mbs * policy.max_length} tokens, above the capacity {policy.capacity}; use "
            f"micro_batch_size <= {max(1, policy.capacity // policy.max_length)}"
        )
    return mbs
