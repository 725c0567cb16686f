"""The per-step strategy selector: one :class:`~balancer.plan.StepPlan` per optimizer step.

For every candidate strategy that can hold the step's longest sequence, the
:class:`Balancer` runs stage 1 (:mod:`balancer.dispatch`) and stage 2
(:mod:`balancer.microbatch`) on the fast path and takes the lowest estimated step time,
adding ``switch_penalty`` seconds to every candidate other than the previous step's.
Optionally CP-SAT refines the chosen strategy's stage 1 within a time budget; the
refined plan is kept only if its final estimate is lower.

Stragglers (Malleus, arXiv 2410.13333): :meth:`Balancer.observe` turns measured per-rank
seconds into relative speeds — an EWMA of ``estimated nominal seconds / measured
seconds``, normalised so the median rank is 1.0 — and a rank's planning speed changes
only when its EWMA moves more than ``speed_hysteresis`` away from it, so noise does not
flip plans. A replica runs at its slowest rank's speed, so a straggler's replica gets
proportionally less work from the next plan on.

Determinism: planning uses no clock and no unseeded randomness, so the same (config,
candidates, speeds, previous strategy, step, batch) give byte-identical
``plan.canonical_json()`` in any process; CP-SAT refinement runs with one worker and a
fixed seed derived from ``(seed, step)`` when ``deterministic`` is set, stopped by
CP-SAT's deterministic time (``refine_time_limit`` read as deterministic units, about a
second of search each) instead of the wall clock, so its answer is the same on every
rank whatever the machine's load. Every rank must
call :meth:`Balancer.observe` with the same numbers (the runtime all-gathers them) in
the same order relative to :meth:`Balancer.plan` / ``next()`` on :meth:`Balancer.prefetch`.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from strategies.layout import ClusterSpec, Strategy

from .cost import CostModel
from .dispatch import (
    Dispatch,
    ReplicaTable,
    Stage1LP,
    dispatch,
    lower_bound,
    quick_lower_bound,
    refine_dispatch,
    stage1_arrays,
    stage1_lp,
)
from .microbatch import MicroBatches, pack_micro_batches
from .plan import ReplicaPlan, StepPlan

__all__ = ["BalancerConfig", "Balancer", "StrategySolution", "solve_strategy"]

_STATE_VERSION = 1
_REFINE_CHOICES = ("none", "cpsat")
_RECENT_PLANS = 64
"""Plans whose per-replica speeds are remembered for :meth:`Balancer.observe`."""


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
        for name in ("seed", "max_extra_micro_batches", "refine_max_variables"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"BalancerConfig: {name}={v!r} must be an integer >= 0")
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
    """float64[n, K], ``a·s² + b·s`` per type."""

    @property
    def est_step_seconds(self) -> float:
        return self.micro.step_seconds


def _stage2(table: ReplicaTable, lengths: np.ndarray, t: np.ndarray, d: Dispatch, config: BalancerConfig) -> MicroBatches:
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
    micro = _stage2(table, lengths, t, d, config)
    return StrategySolution(table=table, dispatch=d, micro=micro, stage1_times=w, item_seconds=t)


@dataclass(frozen=True, eq=False)
class _SpeedState:
    """Per-rank planning speeds and the candidate tables built for them (replaced, never mutated)."""

    rank_speed: np.ndarray
    tables: tuple[ReplicaTable, ...]


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
    return arr.astype(np.int64)


class Balancer:
    """Per-step planner over a fixed pool of candidate strategies (see module docstring)."""

    def __init__(
        self,
        cluster: ClusterSpec,
        candidates: Sequence[Strategy],
        cost_model: CostModel,
        config: BalancerConfig | None = None,
    ) -> None:
        self.config = config if config is not None else BalancerConfig()
        if not isinstance(self.config, BalancerConfig):
            raise ValueError(f"Balancer: config must be a BalancerConfig, got {type(self.config).__name__}")
        cands = list(candidates)
        if not cands:
            raise ValueError(
                "Balancer: the candidate list is empty; pass at least one Strategy, e.g. "
                f"[Strategy.homogeneous(Layout(tp=1), {cluster.num_ranks})] or strategies.candidates.generate_candidates(...)"
            )
        names: dict[str, int] = {}
        for k, strat in enumerate(cands):
            if not isinstance(strat, Strategy):
                raise ValueError(f"Balancer: candidate {k} is a {type(strat).__name__}, expected a Strategy")
            try:
                strat.check_cluster(cluster)
            except ValueError as e:
                raise ValueError(f"Balancer: candidate {k} ({strat.name!r}) does not match the cluster: {e}") from None
            if strat.name in names:
                raise ValueError(
                    f"Balancer: candidates {names[strat.name]} and {k} are both named {strat.name!r}; "
                    "plans and checkpoints identify strategies by name, so give each a unique name"
                )
            names[strat.name] = k
            for lay in strat.counts():
                try:
                    cost_model.cost(lay)
                except ValueError as e:
                    raise ValueError(f"Balancer: candidate {k} ({strat.name!r}) uses layout {lay.name}: {e}") from None
        self.cluster_spec = cluster
        self.candidates: tuple[Strategy, ...] = tuple(cands)
        self.cost_model = cost_model
        self._index = names
        self._lock = threading.RLock()
        self._ewma = np.asarray(cluster.speed, dtype=np.float64).copy()
        self._state = self._build_state(self._ewma.copy())
        self._previous: str | None = None
        self._num_observations = 0
        self._recent: OrderedDict[int, tuple[str, np.ndarray]] = OrderedDict()

    # -- views -------------------------------------------------------------------------------
    def _build_state(self, rank_speed: np.ndarray) -> _SpeedState:
        tables = tuple(ReplicaTable.build(s, self.cost_model, rank_speed) for s in self.candidates)
        return _SpeedState(rank_speed=rank_speed, tables=tables)

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence (tokens) some candidate can hold."""
        return max(t.max_capacity for t in self._state.tables)

    @property
    def cluster(self) -> ClusterSpec:
        """The cluster with the per-rank speeds planning uses now (for :func:`balancer.plan.validate`)."""
        return self.cluster_spec.with_speed(self._state.rank_speed.tolist())

    @property
    def rank_speed(self) -> np.ndarray:
        """float64[num_ranks], the relative speeds planning uses now (copy)."""
        return self._state.rank_speed.copy()

    @property
    def previous_strategy(self) -> str | None:
        """Name of the strategy of the last plan (the one that pays no switch penalty)."""
        return self._previous

    # -- planning -----------------------------------------------------------------------------
    def plan(
        self,
        lengths: np.ndarray | Sequence[int],
        *,
        step: int = 0,
        sample_ids: np.ndarray | Sequence[int] | None = None,
        loss_tokens: np.ndarray | Sequence[int] | None = None,
    ) -> StepPlan:
        """Plan one step. ``lengths`` tokens per sequence; ``sample_ids`` default ``0..n-1``;
        ``loss_tokens`` default ``lengths − 1`` (the first token of a sequence has no label)."""
        return self._plan(self._state, lengths, step, sample_ids, loss_tokens)

    def _plan(
        self,
        state: _SpeedState,
        lengths_in: Any,
        step: int,
        sample_ids_in: Any,
        loss_tokens_in: Any,
    ) -> StepPlan:
        t0 = time.perf_counter()
        lengths, sample_ids, loss = self._check_batch(lengths_in, sample_ids_in, loss_tokens_in)
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step={step!r} must be an integer >= 0")
        step = int(step)
        longest = int(lengths.max())
        feasible = [k for k, tbl in enumerate(state.tables) if tbl.max_capacity >= longest]
        if not feasible:
            self._raise_too_long(lengths, sample_ids)
        cfg = self.config
        with self._lock:
            # Every candidate's bound (one item; LP by type on the stage-1 times) first, then
            # both stages in increasing bound order, skipping the candidates whose bound
            # (plus switch penalty) already exceeds the best score found: their estimate
            # cannot beat it, so the choice is the one an exhaustive loop makes (lowest
            # score, ties to the earlier candidate).
            # The bounds use each distinct length once (with its count): same values, and the
            # LP has a row per distinct length instead of per sequence.
            distinct, counts = np.unique(lengths, return_counts=True)
            prepared = []
            for k in feasible:
                table = state.tables[k]
                t_d, w_d = stage1_arrays(table, distinct)
                lp_d = stage1_lp(table, w_d, counts)
                penalty = 0.0
                if self._previous is not None and self.candidates[k].name != self._previous:
                    penalty = cfg.switch_penalty
                prepared.append((quick_lower_bound(table, distinct, t_d, lp_d, counts) + penalty, k, penalty, lp_d))
            prepared.sort(key=lambda p: (p[0], p[1]))
            best: StrategySolution | None = None
            best_score = math.inf
            best_k = -1
            best_lp: Stage1LP | None = None
            for bound_score, k, penalty, lp_d in prepared:
                if bound_score > best_score:
                    break  # sorted by bound: no later candidate can win either
                sol = solve_strategy(state.tables[k], lengths, cfg)
                score = sol.est_step_seconds + penalty
                if score < best_score or (score == best_score and k < best_k):
                    best, best_score, best_k, best_lp = sol, score, k, lp_d
            assert best is not None
            bound = lower_bound(best.table, lengths, best.item_seconds, w=best.stage1_times, lp=best_lp)
            best, solver = self._refine(best, lengths, bound, step)
            plan = self._assemble(best, lengths, sample_ids, loss, bound, step, solver, time.perf_counter() - t0)
            self._previous = plan.strategy
            self._recent[step] = (plan.strategy, best.table.speed.copy())
            self._recent.move_to_end(step)
            while len(self._recent) > _RECENT_PLANS:
                self._recent.popitem(last=False)
        return plan

    def _check_batch(self, lengths_in: Any, sample_ids_in: Any, loss_in: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
            bad = np.flatnonzero((loss < 0) | (loss > lengths))
            if bad.size:
                i = int(bad[0])
                raise ValueError(
                    f"loss_tokens[{i}] = {int(loss[i])} must be between 0 and the sequence length {int(lengths[i])}"
                )
        return lengths, sample_ids, loss

    def _raise_too_long(self, lengths: np.ndarray, sample_ids: np.ndarray) -> None:
        cap = self.max_sequence_length
        i = int(np.flatnonzero(lengths > cap)[0])
        raise ValueError(
            f"sample {int(sample_ids[i])} (batch position {i}) has {int(lengths[i])} tokens, above the largest "
            f"capacity {cap} of any candidate strategy; raise the loader's max length handling, add a candidate "
            "layout with more tp or cp, or use the loader's overlong policy ('truncate', 'split' or 'drop')"
        )

    def _refine(
        self, sol: StrategySolution, lengths: np.ndarray, bound: float, step: int
    ) -> tuple[StrategySolution, str]:
        cfg = self.config
        if cfg.refine != "cpsat":
            return sol, "greedy"
        if sol.est_step_seconds <= bound * (1.0 + cfg.refine_min_gap):
            return sol, "greedy (cpsat skipped: at bound)"
        if lengths.size * sol.table.num_replicas > cfg.refine_max_variables:
            return sol, "greedy (cpsat skipped: too large)"
        seed = (cfg.seed * 1_000_003 + step) % (2**31 - 1)
        d2 = refine_dispatch(
            sol.table,
            lengths,
            sol.stage1_times,
            sol.dispatch,
            time_limit=cfg.refine_time_limit,
            seed=seed,
            num_workers=1 if cfg.deterministic else cfg.cpsat_workers,
            deterministic_time=cfg.refine_time_limit if cfg.deterministic else None,
        )
        if not np.array_equal(d2.bin_of, sol.dispatch.bin_of):
            micro = _stage2(sol.table, lengths, sol.item_seconds, d2, cfg)
            if micro.step_seconds < sol.est_step_seconds:
                refined = StrategySolution(
                    table=sol.table, dispatch=d2, micro=micro, stage1_times=sol.stage1_times, item_seconds=sol.item_seconds
                )
                return refined, "greedy+cpsat"
        return sol, "greedy (cpsat: no gain)"

    def _assemble(
        self,
        sol: StrategySolution,
        lengths: np.ndarray,
        sample_ids: np.ndarray,
        loss: np.ndarray,
        bound: float,
        step: int,
        solver: str,
        elapsed: float,
    ) -> StepPlan:
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

    # -- stragglers ------------------------------------------------------------------------------
    def observe(self, rank_seconds: Sequence[float] | np.ndarray, plan: StepPlan) -> None:
        """Update per-rank speeds from one step's measured compute seconds (one entry per rank).

        Every rank must call this with identical numbers; the update is pure arithmetic on
        them. Ranks of idle replicas and ranks that report 0 seconds get no sample.
        """
        cfg = self.config
        n = self.cluster_spec.num_ranks
        x = np.asarray(rank_seconds, dtype=np.float64)
        if x.shape != (n,):
            raise ValueError(f"observe: got {x.size} rank times for a cluster of {n} ranks; give one per rank")
        bad = np.flatnonzero(~np.isfinite(x) | (x < 0))
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"observe: rank_seconds[{r}] = {x[r]}; measured seconds must be finite and >= 0")
        if plan.strategy not in self._index:
            raise ValueError(
                f"observe: plan strategy {plan.strategy!r} is not a candidate of this balancer "
                f"({', '.join(self._index)}); observe plans this balancer made"
            )
        with self._lock:
            remembered = self._recent.get(plan.step)
            if remembered is not None and remembered[0] == plan.strategy:
                speed = remembered[1]
            else:  # a plan from before a restart: assume today's speeds
                speed = self._state.tables[self._index[plan.strategy]].speed
            if len(plan.replicas) != speed.size:
                raise ValueError(f"observe: plan has {len(plan.replicas)} replicas, strategy {plan.strategy!r} has {speed.size}")
            sample = np.full(n, np.nan)
            for j, rep in enumerate(plan.replicas):
                nominal = rep.est_seconds * float(speed[j])
                if nominal <= 0.0:
                    continue
                ranks = np.asarray(rep.ranks, dtype=np.int64)
                measured = x[ranks]
                ok = measured > 0
                sample[ranks[ok]] = nominal / measured[ok]
            has = np.isfinite(sample)
            if not has.any():
                return
            sample = np.clip(sample, cfg.min_speed, cfg.max_speed)
            ewma = self._ewma.copy()
            ewma[has] = (1.0 - cfg.speed_ewma) * ewma[has] + cfg.speed_ewma * sample[has]
            ewma = np.clip(ewma / float(np.median(ewma)), cfg.min_speed, cfg.max_speed)
            self._ewma = ewma
            self._num_observations += 1
            current = self._state.rank_speed
            moved = np.abs(ewma / current - 1.0) > cfg.speed_hysteresis
            if moved.any():
                speed_new = current.copy()
                speed_new[moved] = ewma[moved]
                self._state = self._build_state(speed_new)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Small resumable state: speeds, previous strategy, counters, version."""
        with self._lock:
            return {
                "version": _STATE_VERSION,
                "rank_speed": self._state.rank_speed.tolist(),
                "speed_ewma": self._ewma.tolist(),
                "previous_strategy": self._previous,
                "num_observations": self._num_observations,
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. A previous strategy that is no longer a candidate is forgotten
        (the next step then pays no switch penalty for any candidate)."""
        version = int(state.get("version", -1))
        if version != _STATE_VERSION:
            raise ValueError(f"cannot resume balancer state version {state.get('version')!r} (expected {_STATE_VERSION})")
        n = self.cluster_spec.num_ranks
        speed = np.asarray(state["rank_speed"], dtype=np.float64)
        ewma = np.asarray(state["speed_ewma"], dtype=np.float64)
        for name, arr in (("rank_speed", speed), ("speed_ewma", ewma)):
            if arr.shape != (n,):
                raise ValueError(f"cannot resume: {name} has {arr.size} entries but the cluster has {n} ranks")
            if not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
                raise ValueError(f"cannot resume: {name} holds non-positive or non-finite speeds")
        previous = state.get("previous_strategy")
        with self._lock:
            self._ewma = ewma.copy()
            self._state = self._build_state(speed.copy())
            self._previous = str(previous) if previous in self._index else None
            self._num_observations = int(state.get("num_observations", 0))
            self._recent.clear()

    # -- background planning --------------------------------------------------------------------------
    def prefetch(
        self, batches: Iterable[tuple[Any, ...]], depth: int = 2
    ) -> Iterator[StepPlan]:
        """Plan ``depth`` steps ahead in a background thread; yields plans in batch order.

        ``batches`` yields ``(step, lengths, sample_ids)`` (optionally a fourth item,
        ``loss_tokens``); it is consumed by the background thread. An exception from the
        batches or from planning is raised to the consumer at the plan where it occurred.
        Closing the iterator (``close()``, ``break`` + garbage collection) stops the thread.

        Plans are requested from the consumer's thread: the speeds a plan uses are those
        current when it was requested (at the ``next()`` call ``depth`` plans earlier), so
        ranks that interleave ``next()`` and :meth:`observe` in the same order agree.
        """
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"prefetch: depth={depth!r} must be an integer >= 1")
        return self._prefetch(iter(batches), depth)

    def _prefetch(self, source: Iterator[tuple[Any, ...]], depth: int) -> Iterator[StepPlan]:
        requests: queue.Queue[_SpeedState | None] = queue.Queue()
        results: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth + 1)
        stop = threading.Event()

        def worker() -> None:
            while True:
                state = requests.get()
                if state is None or stop.is_set():
                    return
                try:
                    item = next(source)
                except StopIteration:
                    results.put(("done", None))
                    return
                except BaseException as e:  # handed to the consumer, which re-raises it
                    results.put(("error", e))
                    return
                try:
                    if not isinstance(item, tuple) or len(item) not in (3, 4):
                        raise ValueError(
                            f"prefetch: each batch must be (step, lengths, sample_ids[, loss_tokens]), got {type(item).__name__}"
                        )
                    step, lengths, ids = item[0], item[1], item[2]
                    loss = item[3] if len(item) == 4 else None
                    results.put(("plan", self._plan(state, lengths, step, ids, loss)))
                except BaseException as e:
                    results.put(("error", e))
                    return

        thread = threading.Thread(target=worker, name="hydraulis-balancer-prefetch", daemon=True)
        thread.start()
        try:
            for _ in range(depth):
                requests.put(self._state)
            while True:
                kind, value = results.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                requests.put(self._state)
                yield value
        finally:
            stop.set()
            requests.put(None)
            thread.join()
