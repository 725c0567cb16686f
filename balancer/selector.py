"""The per-step strategy selector: one :class:`~strategies.plan.StepPlan` per optimizer step.

For every candidate strategy that can hold the step's longest sequence, the
:class:`Balancer` runs stage 1 (:mod:`balancer.stage1`) and stage 2
(:mod:`balancer.microbatch`) on the fast path and takes the lowest estimated step time,
adding ``switch_penalty`` seconds to every candidate other than the previous step's.
Optionally CP-SAT refines the chosen strategy's stage 1 within a time budget; the
refined plan is kept only if its final estimate is lower. The step's input checks and the
plan written out from the chosen solution are in :mod:`balancer.selector_io`.

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
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from strategies.layout import ClusterSpec, Strategy
from strategies.plan import StepPlan

from .bounds import lower_bound, quick_lower_bound
from .cost import CostModel
from .prefetch import plan_ahead
from .selector_io import assemble_plan, check_batch
from .solve import BalancerConfig, StrategySolution, solve_strategy, stage2
from .stage1 import (
    ReplicaTable,
    Stage1LP,
    refine_dispatch,
    stage1_arrays,
    stage1_lp,
)

__all__ = ["BalancerConfig", "Balancer", "StrategySolution", "solve_strategy"]

_STATE_VERSION = 1
_RECENT_PLANS = 64
"""Plans whose per-replica speeds are remembered for :meth:`Balancer.observe`."""


@dataclass(frozen=True, eq=False)
class _SpeedState:
    """Per-rank planning speeds and the candidate tables built for them (replaced, never mutated)."""

    rank_speed: np.ndarray
    tables: tuple[ReplicaTable, ...]


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
                f"[Strategy.homogeneous(Layout(tp=1), {cluster.num_ranks})] or balancer.pool.generate_candidates(...)"
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
        """The cluster with the per-rank speeds planning uses now (for :func:`strategies.plan.validate`)."""
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
        lengths, sample_ids, loss = check_batch(lengths_in, sample_ids_in, loss_tokens_in)
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
            plan = assemble_plan(best, lengths, sample_ids, loss, bound, step, solver, time.perf_counter() - t0)
            self._previous = plan.strategy
            self._recent[step] = (plan.strategy, best.table.speed.copy())
            self._recent.move_to_end(step)
            while len(self._recent) > _RECENT_PLANS:
                self._recent.popitem(last=False)
        return plan

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
            micro = stage2(sol.table, lengths, sol.item_seconds, d2, cfg)
            if micro.step_seconds < sol.est_step_seconds:
                refined = StrategySolution(
                    table=sol.table, dispatch=d2, micro=micro, stage1_times=sol.stage1_times, item_seconds=sol.item_seconds
                )
                return refined, "greedy+cpsat"
        return sol, "greedy (cpsat: no gain)"

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
        return plan_ahead(
            lambda state, step, lengths, ids, loss: self._plan(state, lengths, step, ids, loss),
            lambda: self._state,
            iter(batches),
            depth,
        )
