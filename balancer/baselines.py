"""Named baseline policies: how other systems split a global batch, scored by our cost model.

Every policy turns one global batch (sequence lengths in tokens, with sample ids) into a
:class:`~balancer.plan.StepPlan` on a fixed strategy, so one scorer — the cost model's
replica time ``Σ_k T(m_k) + v·c + (pp−1)·max_k T(m_k)`` — applies to all of them and to
the :class:`~balancer.selector.Balancer`. Each is written from its published description
(see ``docs/baselines.md`` for sources and for how each maps onto our strategies):

* ``padded`` — random equal-count split, fixed-size micro-batches padded to their
  longest sequence (the Hugging Face ``Trainer`` default);
* ``length_grouped`` — ``group_by_length``: mega-batches sorted by length, then split;
* ``multipack`` — token first-fit-decreasing, one bin per rank per step;
* ``bfd`` — token best-fit-decreasing packing (TRL, OLMo-core), bins dealt to ranks;
* ``megatron_dp_balanced`` — next-fit in sampler order, equal bin counts per rank;
* ``megatron_hybrid_cp`` — power-of-two cp per sequence, least-loaded greedy on L²/cp;
* ``wlb_llm`` — outlier delay queue + least-workload greedy on αL²+βL (OSDI 2025);
* ``hydraulis_random_restart`` — 50 shuffled orders, each placed greedily; best kept.

Padding. ``padded`` and ``length_grouped`` run each micro-batch as a padded rectangle:
a micro-batch of ``v`` sequences padded to its longest sequence ``s_max`` costs
``v·t(s_max) + c`` seconds and ``v·s_max`` tokens of memory. A ``StepPlan`` holds sample
ids only, so its ``est_seconds`` stay the unpadded cost-model times (what
:func:`~balancer.plan.validate` recomputes); the padded time is what
:func:`score_plan` returns with ``padded=True`` and what :meth:`BaselinePolicy.score`
returns for these two policies. Simulations and benchmarks always use ``score``.

Every policy derives its randomness from ``(seed, step)``, so every rank computes the
same plan. Policies are stateless except ``wlb_llm``, whose outlier queue carries
sequences into later steps (``flush=True`` at the end of an epoch empties it).
"""

from __future__ import annotations

import heapq
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
from numba import njit

from packers.binpack import best_fit_decreasing, first_fit_decreasing, next_fit
from packers.types import group_by_bin
from strategies.candidates import enumerate_layouts
from strategies.layout import ClusterSpec, Layout, Replica, Strategy

from .cost import CostModel, replica_seconds
from .plan import ReplicaPlan, StepPlan

__all__ = [
    "BASELINES",
    "BaselinePolicy",
    "Placement",
    "PlanScore",
    "baseline_names",
    "greedy_dispatch",
    "make_baseline",
    "random_restart_dispatch",
    "score_plan",
    "static_layout",
    "static_strategy",
    "strategy_lower_bound",
]


# ----------------------------------------------------------------------------------------
# Static layout: what a system without per-step strategy selection would run
# ----------------------------------------------------------------------------------------


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def _priced(cost_model: CostModel, layout: Layout) -> bool:
    """Whether the cost model can price ``layout`` (an analytic model may refuse some)."""
    if not cost_model.supports(layout):
        return False
    try:
        cost_model.cost(layout)
    except ValueError:
        return False
    return True


def static_layout(
    cluster: ClusterSpec,
    cost_model: CostModel,
    max_length: int,
    *,
    layouts: Sequence[Layout] | None = None,
    prefer_cp: bool = False,
) -> Layout:
    """The homogeneous layout a static system would pick for sequences up to ``max_length``.

    That is the layout with the smallest model-parallel degree ``tp·cp·pp`` whose token
    capacity holds one ``max_length``-token sequence. Ties (same degree) go to the layout
    that runs that sequence fastest, or with ``prefer_cp`` to the one with the largest
    ``cp`` and ``pp = 1`` (the static layout a context-parallel system such as Megatron's
    hybrid CP starts from). ``layouts`` defaults to
    :func:`strategies.candidates.enumerate_layouts` (power-of-two tp/cp layouts that fit
    the cluster and memory, no pipeline): the layouts the Balancer's candidates use.
    """
    if max_length < 1:
        raise ValueError(f"static_layout: max_length={max_length} must be >= 1 token")
    pool = list(layouts) if layouts is not None else enumerate_layouts(cluster, cost_model)
    fits = [
        lay
        for lay in pool
        if cluster.num_ranks % lay.size == 0
        and _priced(cost_model, lay)
        and cost_model.token_capacity(lay) >= max_length
        and not (prefer_cp and lay.pp > 1)
    ]
    if not fits:
        best = max((cost_model.token_capacity(lay) for lay in pool if _priced(cost_model, lay)), default=0)
        raise ValueError(
            f"no layout on {cluster.num_ranks} ranks holds a {max_length}-token sequence "
            f"(largest capacity {best} tokens); lower max_length or add larger layouts to the cost model"
        )

    def key(lay: Layout) -> tuple[Any, ...]:
        if prefer_cp:
            return (lay.size, -lay.cp, lay.tp, lay.name)
        return (lay.size, cost_model.replica_seconds([[max_length]], lay), lay.name)

    return min(fits, key=key)


def static_strategy(
    cluster: ClusterSpec,
    cost_model: CostModel,
    max_length: int,
    *,
    layouts: Sequence[Layout] | None = None,
    prefer_cp: bool = False,
) -> Strategy:
    """:func:`static_layout` replicated over the whole cluster."""
    lay = static_layout(cluster, cost_model, max_length, layouts=layouts, prefer_cp=prefer_cp)
    return Strategy.homogeneous(lay, cluster.num_ranks)


# ----------------------------------------------------------------------------------------
# Scoring and bounds (shared by every policy, the simulator and the benchmarks)
# ----------------------------------------------------------------------------------------


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
    """Score ``plan`` (``lengths`` maps sample id → tokens, as in :func:`~balancer.plan.validate`).

    With ``padded`` each micro-batch of ``v`` sequences costs ``v·t(s_max)`` instead of
    ``Σ t(s_i)`` and adds ``v·s_max − Σ s_i`` pad tokens.
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

    The larger of (1) the longest single sequence: a replica holding sequence ``i`` runs at
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


# ----------------------------------------------------------------------------------------
# Greedy dispatch kernels (stage 1 of hydraulis_random_restart; instance replay)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    """Sequences → replicas: ``bin_of[i]`` is sequence i's replica; loads in seconds."""

    bin_of: np.ndarray
    loads: np.ndarray
    makespan: float
    solver: str


@njit(cache=True)
def _greedy_place(order, times, bin_type, pp_weight, speed):  # pragma: no cover - numba
    # Each sequence in ``order`` goes to the eligible bin whose load after adding it is
    # smallest; load_j = (Σ t + pp_weight_j · max t) / speed_j. Returns bin_of (-1 when a
    # sequence has no eligible bin) and the loads.
    n = times.shape[0]
    m = bin_type.shape[0]
    sums = np.zeros(m)
    maxs = np.zeros(m)
    bin_of = np.full(n, -1, dtype=np.int64)
    for i in order:
        best = np.inf
        bj = -1
        for j in range(m):
            t = times[i, bin_type[j]]
            if not np.isfinite(t):
                continue
            mx = maxs[j] if maxs[j] > t else t
            load = (sums[j] + t + pp_weight[j] * mx) / speed[j]
            if load < best:
                best = load
                bj = j
        if bj < 0:
            return bin_of, np.full(m, np.inf)
        t = times[i, bin_type[bj]]
        sums[bj] += t
        if t > maxs[bj]:
            maxs[bj] = t
        bin_of[i] = bj
    loads = (sums + pp_weight * maxs) / speed
    return bin_of, loads


@njit(cache=True)
def _best_of_orders(orders, times, bin_type, pp_weight, speed):  # pragma: no cover - numba
    # Greedy placement for every row of ``orders``; keeps the smallest makespan (first on ties).
    best_bins = np.full(times.shape[0], -1, dtype=np.int64)
    best_loads = np.full(bin_type.shape[0], np.inf)
    best = np.inf
    for r in range(orders.shape[0]):
        bins, loads = _greedy_place(orders[r], times, bin_type, pp_weight, speed)
        mk = loads.max() if loads.size else 0.0
        if mk < best:
            best = mk
            best_bins = bins
            best_loads = loads
    return best_bins, best_loads


def _dispatch_args(
    times: np.ndarray, bin_type: np.ndarray, pp_weight: np.ndarray | None, speed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    times = np.ascontiguousarray(times, dtype=np.float64)
    bin_type = np.ascontiguousarray(bin_type, dtype=np.int64)
    if times.ndim != 2:
        raise ValueError(f"times must be a 2-D array [sequences, bin types], got shape {times.shape}")
    m = bin_type.size
    if m == 0:
        raise ValueError("bin_type is empty; give at least one replica")
    if bin_type.min() < 0 or bin_type.max() >= times.shape[1]:
        raise ValueError(f"bin_type values must lie in 0..{times.shape[1] - 1}, got {bin_type.min()}..{bin_type.max()}")
    ppw = np.zeros(m) if pp_weight is None else np.ascontiguousarray(pp_weight, dtype=np.float64)
    spd = np.ones(m) if speed is None else np.ascontiguousarray(speed, dtype=np.float64)
    if ppw.shape != (m,) or spd.shape != (m,):
        raise ValueError(f"pp_weight and speed need one value per bin ({m})")
    if np.any(spd <= 0):
        raise ValueError(f"speed must be > 0 for every bin, got min {spd.min()}")
    eligible = np.isfinite(times[:, bin_type]).any(axis=1)
    if not eligible.all():
        i = int(np.flatnonzero(~eligible)[0])
        raise ValueError(f"sequence {i} is eligible for no bin (every time is inf); raise a capacity or drop it")
    return times, bin_type, ppw, spd


def greedy_dispatch(
    times: np.ndarray,
    bin_type: np.ndarray,
    *,
    order: np.ndarray | None = None,
    pp_weight: np.ndarray | None = None,
    speed: np.ndarray | None = None,
) -> Placement:
    """Place sequences one by one on the eligible bin with the smallest resulting load.

    ``times[i, k]`` is sequence i's seconds on a bin of type ``k`` (``inf`` = not
    eligible); ``bin_type[j]`` is bin j's type; load_j = ``(Σ t + pp_weight_j·max t) /
    speed_j``. ``order`` defaults to longest-processing-time first (decreasing fastest
    eligible time): plain heterogeneous LPT.
    """
    times, bin_type, ppw, spd = _dispatch_args(times, bin_type, pp_weight, speed)
    if order is None:
        fastest = np.where(np.isfinite(times[:, bin_type]), times[:, bin_type], np.inf).min(axis=1)
        order = np.argsort(-fastest, kind="stable")
        solver = "lpt"
    else:
        order = np.asarray(order, dtype=np.int64)
        if sorted(order.tolist()) != list(range(times.shape[0])):
            raise ValueError(f"order must be a permutation of 0..{times.shape[0] - 1}")
        solver = "greedy"
    bins, loads = _greedy_place(np.ascontiguousarray(order, dtype=np.int64), times, bin_type, ppw, spd)
    return Placement(bin_of=bins, loads=loads, makespan=float(loads.max()), solver=solver)


def random_restart_dispatch(
    times: np.ndarray,
    bin_type: np.ndarray,
    *,
    restarts: int = 50,
    seed: int | Sequence[int] = 0,
    pp_weight: np.ndarray | None = None,
    speed: np.ndarray | None = None,
) -> Placement:
    """Hydraulis's dispatch: ``restarts`` shuffled orders, each placed by :func:`greedy_dispatch`'s
    rule; the order with the smallest makespan wins (the first one on ties)."""
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be >= 1 (Hydraulis uses 50)")
    times, bin_type, ppw, spd = _dispatch_args(times, bin_type, pp_weight, speed)
    rng = np.random.default_rng(seed)
    orders = rng.permuted(np.tile(np.arange(times.shape[0], dtype=np.int64), (restarts, 1)), axis=1)
    bins, loads = _best_of_orders(orders, times, bin_type, ppw, spd)
    return Placement(bin_of=bins, loads=loads, makespan=float(loads.max()), solver=f"random_restart{restarts}")


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

    def __init__(
        self,
        cluster: ClusterSpec,
        strategy: Strategy,
        cost_model: CostModel,
        *,
        seed: int = 0,
        max_length: int | None = None,
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
        return 0

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


class PaddedPolicy(BaselinePolicy):
    """Fixed-count random micro-batches, padded to their longest sequence.

    The batch is shuffled and split into equal-count contiguous shares (as a distributed
    sampler does); each share is cut into micro-batches of ``micro_batch_size``
    sequences (default: as many ``max_length`` rows as the capacity holds, so the padded
    rectangle always fits).
    """

    name = "padded"
    pads = True

    def __init__(self, *args: Any, micro_batch_size: int | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.micro_batch_size = _micro_batch_size(self, micro_batch_size)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        perm = rng.permutation(lengths.size)
        out: Assignment = []
        for rep, share in zip(self.strategy.replicas, np.array_split(perm, len(self.strategy.replicas))):
            mbs = [share[k : k + self.micro_batch_size] for k in range(0, share.size, self.micro_batch_size)]
            out.append(_split_largest(mbs, lengths, rep.layout.pp))
        return self.strategy, out


class LengthGroupedPolicy(BaselinePolicy):
    """Hugging Face ``group_by_length``: shuffled mega-batches sorted by length, then split.

    The shuffled batch is cut into mega-batches of ``mult × micro_batch_size`` sequences
    (``mult = min(n // (4·micro_batch_size), 50)``, at least 1, as the
    ``LengthGroupedSampler`` does); each is sorted longest first and cut into
    micro-batches of ``micro_batch_size``, and micro-batch ``b`` goes to replica
    ``b mod R`` (how ``accelerate`` shards batches over processes). Micro-batches are
    padded as in ``padded``.
    """

    name = "length_grouped"
    pads = True

    def __init__(self, *args: Any, micro_batch_size: int | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.micro_batch_size = _micro_batch_size(self, micro_batch_size)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        perm = rng.permutation(lengths.size)
        mbs = self.micro_batch_size
        mega = max(1, min(lengths.size // (4 * mbs), 50)) * mbs
        batches: list[np.ndarray] = []
        for start in range(0, perm.size, mega):
            block = perm[start : start + mega]
            block = block[np.argsort(-lengths[block], kind="stable")]
            batches.extend(block[k : k + mbs] for k in range(0, block.size, mbs))
        out = _deal(batches, len(self.strategy.replicas))
        pps = [rep.layout.pp for rep in self.strategy.replicas]
        return self.strategy, [_split_largest(m, lengths, pp) for m, pp in zip(out, pps)]


def _step_capacity(pack: Callable[[np.ndarray, int], Any], lengths: np.ndarray, num_bins: int, capacity: int) -> int:
    """Bin size for "one bin per rank": the smallest size (found by bisection) from
    ``max(longest, ⌈tokens / R⌉)`` up to the layout capacity for which ``pack`` needs at
    most ``R`` bins; the layout capacity when even that needs more."""
    lo = max(int(lengths.max()), -(-int(lengths.sum()) // num_bins))
    if lo >= capacity or pack(lengths, capacity).num_bins > num_bins:
        return capacity
    hi = capacity  # invariant: hi fits in num_bins bins
    while lo < hi:
        mid = (lo + hi) // 2
        if pack(lengths, mid).num_bins <= num_bins:
            hi = mid
        else:
            lo = mid + 1
    return hi


class MultipackPolicy(BaselinePolicy):
    """Multipack sampler: token first-fit-decreasing, one bin per rank per step.

    The bin size is the per-rank token budget of the step (see :func:`_step_capacity`):
    FFD then fills exactly one bin per replica when the layout capacity allows. A batch
    that needs more than ``R`` bins of the full capacity runs them as successive
    micro-steps, bin ``b`` on replica ``b mod R``.
    """

    name = "multipack"
    packer: ClassVar[Callable[[np.ndarray, int], Any]] = staticmethod(first_fit_decreasing)

    def _bins(self, lengths: np.ndarray) -> list[np.ndarray]:
        pack = type(self).packer
        cap = _step_capacity(pack, lengths, len(self.strategy.replicas), self.capacity)
        packing = pack(lengths, cap)
        return group_by_bin(np.asarray(packing.bin_of), int(packing.num_bins))

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        return self.strategy, self._finish(_deal(self._bins(lengths), len(self.strategy.replicas)), lengths)

    def _finish(self, per_replica: Assignment, lengths: np.ndarray) -> Assignment:
        pps = [rep.layout.pp for rep in self.strategy.replicas]
        return [_split_largest(mbs, lengths, pp) for mbs, pp in zip(per_replica, pps)]


class BestFitPolicy(MultipackPolicy):
    """Best-fit-decreasing packing by tokens (TRL ``packing_strategy="bfd"``, OLMo-core).

    Bins are sized as for ``multipack``. Packed rows are drawn in random order by the data
    loader: the bins are shuffled with the step's seed, then dealt one per replica per
    micro-step.
    """

    name = "bfd"
    packer = staticmethod(best_fit_decreasing)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        bins = self._bins(lengths)
        bins = [bins[k] for k in rng.permutation(len(bins))]
        return self.strategy, self._finish(_deal(bins, len(self.strategy.replicas)), lengths)


class MegatronDpBalancedPolicy(MultipackPolicy):
    """Megatron-Core ``dp_balanced`` packing: next-fit in sampler order, equal bins per rank.

    Sequences are packed in their given order, a new bin opening whenever the next one
    does not fit (bins sized as for ``multipack``). The bin count is then raised to a
    multiple of ``R`` (splitting the fullest bins; empty micro-batches if nothing can be
    split) so every data-parallel rank runs the same number of micro-batches; bin ``b``
    goes to replica ``b mod R``.
    """

    name = "megatron_dp_balanced"
    packer = staticmethod(next_fit)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        bins = self._bins(lengths)
        num = len(self.strategy.replicas)
        bins = _split_largest(bins, lengths, -(-len(bins) // num) * num)
        return self.strategy, self._finish(_deal(bins, num), lengths)


class HydraulisRandomRestartPolicy(BaselinePolicy):
    """Hydraulis's dispatch: the best of ``restarts`` shuffled greedy placements.

    Stage 1 loads follow the Hydraulis instance formula ``Σ t + (pp−1)·max t`` over the
    replicas of the fixed strategy (divided by replica speed); stage 2 packs each
    replica's sequences first-fit-decreasing by tokens into micro-batches (>= pp of them).
    """

    name = "hydraulis_random_restart"

    def __init__(self, *args: Any, restarts: int = 50, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if restarts < 1:
            raise ValueError(f"restarts={restarts} must be >= 1 (Hydraulis uses 50)")
        self.restarts = int(restarts)
        layouts = sorted(set(self.strategy.layouts))
        self._layouts = layouts
        self._bin_type = np.array([layouts.index(r.layout) for r in self.strategy.replicas], dtype=np.int64)
        self._pp_weight = np.array([r.layout.pp - 1 for r in self.strategy.replicas], dtype=np.float64)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        times = np.empty((lengths.size, len(self._layouts)))
        for k, lay in enumerate(self._layouts):
            cost = self.cost_model.cost(lay)
            times[:, k] = np.where(lengths <= cost.token_capacity, cost.seconds(lengths), np.inf)
        seed = int(rng.integers(2**31))
        got = random_restart_dispatch(
            times, self._bin_type, restarts=self.restarts, seed=seed,
            pp_weight=self._pp_weight, speed=np.array(self._speeds),
        )
        per_replica = group_by_bin(got.bin_of, len(self.strategy.replicas))
        out = [
            _pack_tokens(pos, lengths, self.cost_model.token_capacity(rep.layout), rep.layout.pp)
            for rep, pos in zip(self.strategy.replicas, per_replica)
        ]
        return self.strategy, out


class WlbLlmPolicy(BaselinePolicy):
    """WLB-LLM (OSDI 2025) workload-aware packing with outlier delay.

    * Workload of a sequence: ``α·L² + β·L`` (default α, β = the layout's a, b).
    * Outlier delay: a sequence longer than a threshold enters that level's FIFO queue
      instead of this step. When a queue holds at least as many sequences as the step has
      micro-batches (``N = R·k``), ``N`` of them (oldest first) join the step, so each
      micro-batch gets one; full rounds are released while the queue allows.
      ``flush=True`` (end of epoch) releases everything, so no sequence is lost.
    * Packing: released outliers, then the rest, each longest-workload first, go to the
      micro-batch with the least workload that still has token room; ``k`` (micro-batches
      per replica) starts at ``max(pp, ⌈tokens / (R·capacity)⌉)`` and grows if something
      does not fit. Micro-batch ``b`` runs on replica ``b mod R``.
    Delayed sequences are trained one or more steps later than sampled: the order of
    samples changes, their multiset per epoch does not.
    """

    name = "wlb_llm"

    def __init__(
        self,
        *args: Any,
        outlier_thresholds: Sequence[int] | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        if len(set(self.strategy.layouts)) != 1:
            raise ValueError("wlb_llm runs on a homogeneous strategy (one layout for every replica)")
        cost = self.cost_model.cost(self.strategy.layouts[0])
        self.alpha = cost.a if alpha is None else float(alpha)
        self.beta = cost.b if beta is None else float(beta)
        levels = (self.max_length // 2,) if outlier_thresholds is None else tuple(int(t) for t in outlier_thresholds)
        if any(t < 1 for t in levels) or list(levels) != sorted(set(levels)):
            raise ValueError(f"outlier_thresholds={levels} must be increasing positive token counts")
        self.outlier_thresholds = levels
        """Level ``q`` holds sequences longer than ``outlier_thresholds[q]`` (and not longer
        than the next threshold), tokens."""
        self._queues: list[list[tuple[int, int, int]]] = [[] for _ in levels]  # (id, length, loss)

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues)

    def state_dict(self) -> dict[str, Any]:
        """The outlier queues (sample id, tokens, loss tokens), oldest first."""
        return {"version": 1, "queues": [[list(x) for x in q] for q in self._queues]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        queues = state.get("queues", [])
        if int(state.get("version", 0)) != 1 or len(queues) != len(self._queues):
            raise ValueError(
                f"cannot resume wlb_llm: state has {len(queues)} queue levels (version {state.get('version')}), "
                f"this policy has {len(self._queues)}; use the same outlier_thresholds"
            )
        self._queues = [[(int(i), int(s), int(lo)) for i, s, lo in q] for q in queues]

    def _num_replicas(self) -> int:
        return len(self.strategy.replicas)

    def _admit(
        self, lengths: np.ndarray, ids: np.ndarray, loss: np.ndarray, flush: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        level = np.searchsorted(np.array(self.outlier_thresholds), lengths, side="left") - 1
        regular = level < 0
        for p in np.flatnonzero(~regular):
            self._queues[int(level[p])].append((int(ids[p]), int(lengths[p]), int(loss[p])))
        pp = self.strategy.layouts[0].pp
        k0 = max(pp, -(-int(lengths[regular].sum()) // (self._num_replicas() * self.capacity)))
        rounds = self._num_replicas() * k0
        released: list[tuple[int, int, int]] = []
        for q in reversed(range(len(self._queues))):
            queue = self._queues[q]
            take = len(queue) if flush else (len(queue) // rounds) * rounds
            released.extend(queue[:take])
            del queue[:take]
        rel = np.array(released, dtype=np.int64).reshape(-1, 3)
        return (
            np.concatenate([rel[:, 1], lengths[regular]]),
            np.concatenate([rel[:, 0], ids[regular]]),
            np.concatenate([rel[:, 2], loss[regular]]),
        )

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        num = self._num_replicas()
        pp = self.strategy.layouts[0].pp
        s = lengths.astype(np.float64)
        work = self.alpha * s * s + self.beta * s
        order = np.argsort(-work, kind="stable")  # outliers are the heaviest, so they go first
        k = max(pp, -(-int(lengths.sum()) // (num * self.capacity)))
        while True:
            bin_of = _least_loaded(order, work, lengths, num * k, self.capacity)
            if bin_of.min() >= 0:
                break
            k += 1
        bins = group_by_bin(bin_of, num * k)
        per_replica = _deal(bins, num)
        return self.strategy, [_split_largest(mbs, lengths, pp) for mbs in per_replica]


class MegatronHybridCpPolicy(BaselinePolicy):
    """Megatron-Core hybrid (dynamic) context parallelism on the static layout's cp groups.

    The static strategy has ``D`` replicas of ``(tp, C, pp)``; its ``D·C`` cp slots form
    one pool. Each sequence gets the smallest power-of-two cp degree ``k <= C`` whose
    layout ``(tp, k, pp)`` holds it (Megatron's ``gpus_needed``). Per step the pool is cut
    into groups: every cp degree in use gets one group, further groups go to the degree
    with the most cost-model rank-seconds per slot while slots remain (and while it has
    more sequences than groups); groups are laid out largest
    first, so each stays inside one static replica. Inside a degree, sequences go
    longest first to the group with the least ``Σ L²/k`` (Megatron's workload estimate),
    then are packed first-fit-decreasing by tokens into micro-batches. Each group is a
    replica of layout ``(tp, k, pp)`` in this step's strategy.
    """

    name = "megatron_hybrid_cp"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if len(set(self.strategy.layouts)) != 1:
            raise ValueError("megatron_hybrid_cp starts from a homogeneous static strategy")
        base = self.strategy.layouts[0]
        self.base = base
        degrees = [k for k in _powers_of_two(base.cp) if base.cp % k == 0]
        self.degrees: list[int] = []
        self.capacities: list[int] = []
        for k in degrees:
            lay = Layout(tp=base.tp, cp=k, pp=base.pp)
            if _priced(self.cost_model, lay):
                self.degrees.append(k)
                self.capacities.append(self.cost_model.token_capacity(lay))
        # max_length <= capacity of the static layout (checked by the base class)

    def _degree_of(self, lengths: np.ndarray) -> np.ndarray:
        """Index into ``self.degrees`` of the smallest cp degree whose capacity holds each sequence."""
        caps = np.array(self.capacities)
        fits = lengths[:, None] <= caps[None, :]
        return np.argmax(fits, axis=1)

    def _allocate(self, work: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Groups per cp degree: one per degree in use, then by work per slot while slots remain."""
        slots = len(self.strategy.replicas) * self.base.cp
        used = [d for d in range(len(self.degrees)) if counts[d] > 0]
        # Too many degrees for the pool (only with one static replica): run the lightest
        # degrees on the next larger degree in use.
        while sum(self.degrees[d] for d in used) > slots:
            d = used.pop(0)
            nxt = used[0]
            work[nxt] += work[d]
            counts[nxt] += counts[d]
            work[d] = 0
            counts[d] = 0
        groups = np.zeros(len(self.degrees), dtype=np.int64)
        for d in used:
            groups[d] = 1
        free = slots - sum(self.degrees[d] for d in used)
        while free > 0:
            open_ = [d for d in used if self.degrees[d] <= free and groups[d] < counts[d]]
            if not open_:
                break
            d = max(open_, key=lambda q: (work[q] / (groups[q] * self.degrees[q]), -self.degrees[q]))
            groups[d] += 1
            free -= self.degrees[d]
        return groups

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        deg_idx = self._degree_of(lengths)
        sq = lengths.astype(np.float64) ** 2
        base, C = self.base, self.base.cp
        # rank-seconds per degree from the cost model, to size the groups
        work = np.zeros(len(self.degrees))
        for d, k in enumerate(self.degrees):
            members = lengths[deg_idx == d]
            if members.size:
                lay = Layout(tp=base.tp, cp=k, pp=base.pp)
                work[d] = k * float(self.cost_model.seconds(members, lay).sum())
        counts = np.bincount(deg_idx, minlength=len(self.degrees)).astype(np.int64)
        groups = self._allocate(work, counts)
        # sequences of a degree merged upward (single static replica) follow their new degree
        for d in range(len(self.degrees)):
            if counts[d] == 0 and np.any(deg_idx == d):
                deg_idx[deg_idx == d] = next(q for q in range(d + 1, len(self.degrees)) if groups[q] > 0)
        # lay out groups largest first over the slot pool: slot g -> static replica g // C
        replicas: list[Replica] = []
        group_degree: list[int] = []
        slot = 0
        for d in sorted(range(len(self.degrees)), key=lambda q: -self.degrees[q]):
            k = self.degrees[d]
            for _ in range(int(groups[d])):
                static = self.strategy.replicas[slot // C]
                c0 = slot % C
                ranks = [static.rank_at(t, c, p) for p in range(base.pp) for c in range(c0, c0 + k) for t in range(base.tp)]
                replicas.append(Replica(Layout(tp=base.tp, cp=k, pp=base.pp), tuple(ranks)))
                group_degree.append(d)
                slot += k
        k = self.degrees[0]
        while slot < len(self.strategy.replicas) * C:  # leftover slots idle, in the smallest groups
            static = self.strategy.replicas[slot // C]
            c0 = slot % C
            ranks = [static.rank_at(t, c, p) for p in range(base.pp) for c in range(c0, c0 + k) for t in range(base.tp)]
            replicas.append(Replica(Layout(tp=base.tp, cp=k, pp=base.pp), tuple(ranks)))
            group_degree.append(-1)
            slot += k
        assignment: Assignment = [[] for _ in replicas]
        for d in range(len(self.degrees)):
            members = np.flatnonzero(deg_idx == d)
            if members.size == 0:
                continue
            slots_of = [g for g, gd in enumerate(group_degree) if gd == d]
            k = self.degrees[d]
            order = members[np.argsort(-sq[members], kind="stable")]
            local = _least_loaded(
                np.arange(order.size, dtype=np.int64), sq[order] / k, lengths[order], len(slots_of), np.iinfo(np.int64).max
            )
            for g_local, g in enumerate(slots_of):
                pos = np.sort(order[local == g_local])
                assignment[g] = _pack_tokens(pos, lengths, self.capacities[d], base.pp)
        name = "hybridcp:" + "+".join(
            f"{Layout(tp=base.tp, cp=self.degrees[d], pp=base.pp).name}x{int(groups[d])}"
            for d in range(len(self.degrees)) if groups[d]
        )
        return Strategy(name, tuple(replicas)), assignment


BASELINES: dict[str, type[BaselinePolicy]] = {
    "padded": PaddedPolicy,
    "length_grouped": LengthGroupedPolicy,
    "multipack": MultipackPolicy,
    "bfd": BestFitPolicy,
    "megatron_dp_balanced": MegatronDpBalancedPolicy,
    "megatron_hybrid_cp": MegatronHybridCpPolicy,
    "wlb_llm": WlbLlmPolicy,
    "hydraulis_random_restart": HydraulisRandomRestartPolicy,
}
"""Registry: baseline name → policy class (each accepts ``cluster, strategy, cost_model, **kw``)."""


def baseline_names() -> list[str]:
    """Names accepted by :func:`make_baseline`, in registry order."""
    return list(BASELINES)


def make_baseline(
    name: str,
    cluster: ClusterSpec,
    strategy: Strategy | None,
    cost_model: CostModel,
    **kw: Any,
) -> BaselinePolicy:
    """Build the baseline called ``name`` on ``strategy``.

    ``strategy=None`` picks :func:`static_strategy` for ``max_length`` (a keyword then
    required): the smallest model-parallel degree whose capacity holds the longest
    allowed sequence (``megatron_hybrid_cp`` prefers the layout with the most cp at that
    degree). Other keywords go to the policy (``seed``, ``max_length``,
    ``micro_batch_size``, ``restarts``, ``outlier_thresholds``, ``alpha``, ``beta``).
    """
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}") from None
    if strategy is None:
        max_length = kw.get("max_length")
        if max_length is None:
            raise ValueError(f"make_baseline({name!r}, strategy=None) needs max_length= to pick the static layout")
        strategy = static_strategy(cluster, cost_model, int(max_length), prefer_cp=name == "megatron_hybrid_cp")
    return cls(cluster, strategy, cost_model, **kw)

