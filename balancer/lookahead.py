"""Bounded look-ahead: regroup the next ``k`` global batches so that their total time is lowest.

The per-step planner (:class:`~balancer.selector.Balancer`) takes each global batch as
sampled. Two things it cannot change set much of a step's time: which sequences share a
step (a step that holds a 32K-token sequence waits for it, however the rest is balanced)
and how well the step's mix of lengths matches one of the pool's strategies. A
:class:`WindowPlanner` sees a *window* of ``k`` consecutive batches and may move
sequences between them:

* every sequence of the window is trained exactly once, in one of the window's ``k``
  steps, so none is delayed (or advanced) by more than ``k − 1`` steps;
* every regrouped step holds between ``(1 − ε)`` and ``(1 + ε)`` × ``tokens_per_step``
  tokens, and never more than ``tokens_per_step`` plus the window's longest sequence (the
  fixed-batch-size rule the baselines are held to; the tighter of the two applies). Without a token budget (a fixed number of sequences per step) every step
  keeps its sampled number of sequences and the band is ``(1 ± ε)`` × the window's mean
  tokens per step, widened to the sampled steps' own range. A step is therefore either
  inside the band or exactly its sampled batch: when no regrouping of the whole window
  fits the band (an epoch's short last batch), the steps outside it keep their sampled
  sequences (``frozen``) and the rest is regrouped;
* the objective is the window's total estimated time ``Σ_t T(S_t)``, ``T`` being the
  per-step planner's own estimate (the fastest candidate after both stages, candidates
  skipped by their quick bound as the selector skips them; no switch penalty). The
  sampled grouping is always one of the options, so the chosen grouping is never
  estimated slower than the sampled one.

Search (:func:`propose`, pool-independent, numba fill kernels). *smooth* deals the
sequences longest first, each to the step furthest below the mean tokens: every step
gets the window's average mix (a step whose time a long sequence set shares it with
fewer of them). *sorted(f)*: the long sequences (above twice the window's median),
longest first, fill step 0 up to ``f`` × the mean tokens, then step 1, …, and the rest
is dealt as in *smooth* (``f`` = 1 and 0.5): long sequences share steps whose
strategy has large replicas, and the other steps hold only short sequences, for which
small replicas are the efficient ones. Each proposal's steps are renumbered so each
lands on the sampled step it shares most tokens with (:func:`relabel`), then every
proposal is estimated exactly, step by step (a proposal is dropped as soon as its
running total reaches the best), and the lowest total wins; ties keep the sampled
grouping. The pool should hold strategies for those compositions:
``generate_candidates(..., lookahead_steps=k)`` scores its candidates on regrouped
windows too.

Determinism: stable sorts, no clock, no randomness; the planner uses the cluster's
*configured* speeds (never the straggler estimates), so every rank — including ranks
that only receive broadcast plans — regroups a window identically, and a resumed run
regroups it as the uninterrupted one did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from numba import njit

from strategies.layout import ClusterSpec, Strategy

from .bounds import quick_lower_bound
from .cost import CostModel
from .solve import BalancerConfig, solve_strategy
from .stage1 import ReplicaTable, stage1_arrays, stage1_lp

__all__ = ["WindowPlan", "WindowPlanner", "propose", "relabel", "token_band", "window_band", "window_proposals"]


def token_band(reference: float, epsilon: float) -> tuple[float, float]:
    """``((1 − ε)·reference, (1 + ε)·reference)`` tokens."""
    if not (math.isfinite(epsilon) and 0.0 <= epsilon < 1.0):
        raise ValueError(f"look-ahead epsilon={epsilon!r} must be in [0, 1) (e.g. 0.1 for ±10% tokens per step)")
    return (1.0 - epsilon) * reference, (1.0 + epsilon) * reference


def window_band(
    tokens: np.ndarray, counts: np.ndarray, tokens_per_step: int | None, epsilon: float, longest: int | None = None
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """``(lo, hi, frozen, count_cap)`` of a window whose sampled steps hold ``tokens`` tokens and
    ``counts`` sequences.

    With a token budget the band is ``(1 − ε)·tokens_per_step`` to ``(1 + ε)·tokens_per_step``,
    capped at ``tokens_per_step + longest`` (one sequence over the budget: the fixed batch
    size every baseline is held to); ``frozen`` marks the steps whose sampled tokens lie
    outside it, and counts are free. Without one (a fixed number of sequences per step)
    every step keeps its sampled count (``count_cap``, exact) and the band is ``(1 ± ε)`` ×
    the mean sampled tokens, widened to the sampled range.
    """
    k = int(tokens.size)
    if tokens_per_step is not None:
        lo, hi = token_band(float(tokens_per_step), epsilon)
        if longest is not None:
            hi = min(hi, float(tokens_per_step + longest))
        frozen = (tokens < lo) | (tokens > hi)
        return lo, hi, frozen, np.full(k, int(counts.sum()) + 1, dtype=np.int64)
    lo, hi = token_band(float(tokens.mean()) if k else 0.0, epsilon)
    lo, hi = min(lo, float(tokens.min(initial=lo))), max(hi, float(tokens.max(initial=hi)))
    return lo, hi, np.zeros(k, dtype=bool), counts.astype(np.int64)


@dataclass(frozen=True, eq=False)
class WindowPlan:
    """The regrouping of one window (positions index the window's concatenated sequences)."""

    step_of: np.ndarray
    """int64[n], the window step (``0..k−1``) every sequence trains in."""
    est_seconds: np.ndarray
    """float64[k], the per-step planner's estimate of every regrouped step, seconds."""
    sampled_seconds: np.ndarray
    """float64[k], the same estimate of the sampled steps, seconds."""
    proposal: str
    """Which proposal won: ``sampled``, ``smooth``, ``sorted(1)`` or ``sorted(0.5)``."""
    band: tuple[float, float]
    """Token band ``(lo, hi)`` every step not ``frozen`` respects."""
    frozen: np.ndarray
    """bool[k], steps kept exactly as sampled although outside the band (an epoch's short
    last batch; with ``proposal == "sampled"``: every sampled step outside the band)."""

    @property
    def num_steps(self) -> int:
        return int(self.est_seconds.size)

    def steps(self) -> list[np.ndarray]:
        """Positions of every step's sequences, in window order."""
        order = np.argsort(self.step_of, kind="stable")
        cuts = np.searchsorted(self.step_of[order], np.arange(self.num_steps + 1))
        return [order[cuts[t] : cuts[t + 1]] for t in range(self.num_steps)]

    @property
    def gain(self) -> float:
        """Sampled total over regrouped total (``≥ 1``)."""
        total = float(self.est_seconds.sum())
        return float(self.sampled_seconds.sum()) / total if total > 0 else 1.0


# -- proposals (pool-independent) ---------------------------------------------------------------------


@njit(cache=True)
def _fill(lengths, order, step_of, tokens, counts, target, hi, count_cap):
    """Place ``order``'s sequences, each on the step furthest below ``target`` that still has
    room (``tokens + s ≤ hi``, ``counts < count_cap``). Returns False if one fits nowhere."""
    k = tokens.size
    for idx in order:
        s = lengths[idx]
        best = -1
        best_deficit = -np.inf
        for t in range(k):
            if counts[t] >= count_cap[t] or tokens[t] + s > hi:
                continue
            d = target[t] - tokens[t]
            if d > best_deficit:
                best_deficit = d
                best = t
        if best < 0:
            return False
        step_of[idx] = best
        tokens[best] += s
        counts[best] += 1
    return True


@njit(cache=True)
def _pack_in_order(lengths, order, step_of, tokens, counts, limit, count_cap):
    """Place ``order``'s sequences on steps 0, 1, … in turn: a step takes them while its
    tokens stay ``≤ limit`` and it has count room. Stops (leaving the rest unplaced) at the
    last step."""
    k = tokens.size
    t = 0
    for idx in order:
        s = lengths[idx]
        while t < k and (tokens[t] + s > limit or counts[t] >= count_cap[t]):
            t += 1
        if t >= k:
            return
        step_of[idx] = t
        tokens[t] += s
        counts[t] += 1


_SORTED_FILLS = (1.0, 0.5)
"""``sorted(f)`` proposals: the long sequences fill each step up to ``f`` × the mean tokens."""
_LONG = 2.0
"""A sequence is *long* above this many times the window's median length."""


def propose(
    lengths: np.ndarray, k: int, lo: float, hi: float, count_cap: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """Regroupings of one window's sequences into ``k`` steps, pool-independent.

    * ``smooth``: longest first, each to the step furthest below the mean tokens: every
      step gets the window's average mix.
    * ``sorted(f)``: the long sequences (above twice the median), longest first, fill step
      0 up to ``f`` × the mean tokens, then step 1, …; the rest as ``smooth``. Long
      sequences share steps whose strategy has large replicas; the other steps hold only
      short ones, for which small replicas are the efficient ones.

    Only proposals with every step inside ``[lo, hi]`` tokens and ``count_cap`` sequences
    per step (exactly, when ``count_cap`` sums to the number of sequences) are returned;
    ``step_of`` values are ``0..k−1`` with no relation to the sampled steps (see
    :func:`relabel`).
    """
    s = np.ascontiguousarray(lengths, dtype=np.int64)
    n = s.size
    order = np.argsort(-s, kind="stable")
    mean = float(s.sum()) / k
    exact = int(count_cap.sum()) == n
    out: list[tuple[str, np.ndarray]] = []

    def finish(step_of: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
        rest = order[step_of[order] < 0]
        if not _fill(s, rest, step_of, tokens, counts, np.full(k, mean), hi, count_cap):
            return None
        if tokens.min() < lo or (exact and not np.array_equal(counts, count_cap)):
            return None
        return step_of

    def empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.full(n, -1, dtype=np.int64), np.zeros(k), np.zeros(k, dtype=np.int64)

    smooth = finish(*empty())
    if smooth is not None:
        out.append(("smooth", smooth))
    long = order[s[order] > _LONG * float(np.median(s))]
    if long.size:
        for f in _SORTED_FILLS:
            step_of, tokens, counts = empty()
            _pack_in_order(s, long, step_of, tokens, counts, f * mean, count_cap)
            got = finish(step_of, tokens, counts)
            if got is not None and not any(np.array_equal(got, x) for _, x in out):
                out.append((f"sorted({f:g})", got))
    return out


def window_proposals(
    lengths: np.ndarray, sampled: np.ndarray, k: int, tokens_per_step: int | None, epsilon: float
) -> tuple[tuple[float, float], np.ndarray, list[tuple[str, np.ndarray]]]:
    """``(band, frozen, [(name, step_of)])``: the regroupings of a window worth estimating.

    First every step is regrouped (a sampled step below the band — a long sequence did not
    fit — is brought into it); if no proposal fits the band that way (an epoch's short last
    batch), the steps outside the band keep their sampled sequences (``frozen``) and the
    others are regrouped. ``step_of`` is over the whole window, relabelled (:func:`relabel`).
    """
    counts = np.bincount(sampled, minlength=k)
    tokens = np.bincount(sampled, weights=lengths, minlength=k)
    longest = int(lengths.max()) if lengths.size else 0
    lo, hi, out_of_band, count_cap = window_band(tokens, counts, tokens_per_step, epsilon, longest)
    tries = [np.zeros(k, dtype=bool)] + ([out_of_band] if out_of_band.any() else [])
    for frozen in tries:
        free = np.flatnonzero(~frozen)
        if free.size < 2:
            continue
        pos = np.flatnonzero(~frozen[sampled])
        sub_s, sub_sampled, cap = lengths[pos], np.searchsorted(free, sampled[pos]), count_cap[free]
        got = propose(sub_s, free.size, lo, hi, cap)
        if not got:
            continue
        out = []
        for name, grouped in got:
            new = sampled.copy()
            new[pos] = free[relabel(sub_s, sub_sampled, grouped, cap)]
            out.append((name, new))
        return (lo, hi), frozen, out
    return (lo, hi), out_of_band, []


def relabel(lengths: np.ndarray, sampled: np.ndarray, step_of: np.ndarray, count_cap: np.ndarray) -> np.ndarray:
    """Renumber regrouped steps so each lands on the sampled step it shares the most tokens
    with (greedy, ties to lower numbers; among steps of one sequence count when counts are
    fixed): the data order changes no more than the regrouping needs."""
    k = int(count_cap.size)
    overlap = np.zeros((k, k))
    np.add.at(overlap, (step_of, sampled), lengths.astype(np.float64))
    exact = int(count_cap.sum()) == lengths.size
    counts = np.bincount(step_of, minlength=k)
    pairs = sorted((-overlap[g, t], g, t) for g in range(k) for t in range(k))
    target_of = np.full(k, -1, dtype=np.int64)
    used = np.zeros(k, dtype=bool)
    for _, g, t in pairs:
        if target_of[g] >= 0 or used[t] or (exact and counts[g] != count_cap[t]):
            continue
        target_of[g] = t
        used[t] = True
    assert (target_of >= 0).all(), "relabel: a regrouped step found no sampled step of its size"
    return target_of[step_of]


# -- the planner --------------------------------------------------------------------------------------


class WindowPlanner:
    """Regroups windows of global batches for a candidate pool (see the module docstring).

    ``candidates``, ``cost_model`` and ``config`` are the :class:`~balancer.selector.Balancer`'s;
    speeds are ``cluster.speed`` (configured, not measured), so the result is the same on
    every rank and after a restart.
    """

    def __init__(
        self,
        cluster: ClusterSpec,
        candidates: Sequence[Strategy],
        cost_model: CostModel,
        config: BalancerConfig | None = None,
    ) -> None:
        self.config = config if config is not None else BalancerConfig()
        if not candidates:
            raise ValueError("WindowPlanner: the candidate list is empty; pass the Balancer's candidates")
        self.tables = tuple(ReplicaTable.build(s, cost_model, cluster.speed) for s in candidates)
        self.max_capacity = max(t.max_capacity for t in self.tables)

    @classmethod
    def from_balancer(cls, balancer: Any) -> "WindowPlanner":
        """The planner for a :class:`~balancer.selector.Balancer` (its candidates, cost model, config)."""
        return cls(balancer.cluster_spec, balancer.candidates, balancer.cost_model, balancer.config)

    # -- step estimates -----------------------------------------------------------------------------
    def estimate(self, lengths: np.ndarray) -> float:
        """The per-step planner's estimate of one step (seconds): the fastest candidate after
        both stages, candidates skipped by their quick bound exactly as the selector does."""
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        return self._solve(lengths, self._bounds(lengths))

    def _bounds(self, lengths: np.ndarray) -> list[tuple[float, int]]:
        """``(quick lower bound, candidate)`` of every candidate that holds the step, sorted."""
        if lengths.size == 0:
            return [(0.0, -1)]
        distinct, counts = np.unique(lengths, return_counts=True)
        prepared = []
        for k, table in enumerate(self.tables):
            if table.max_capacity < int(distinct[-1]):
                continue
            t_d, w_d = stage1_arrays(table, distinct)
            lp = stage1_lp(table, w_d, counts)
            prepared.append((quick_lower_bound(table, distinct, t_d, lp, counts), k))
        if not prepared:
            raise ValueError(
                f"a sequence of {int(distinct[-1])} tokens is above every candidate's capacity ({self.max_capacity})"
            )
        return sorted(prepared)

    def _solve(self, lengths: np.ndarray, prepared: list[tuple[float, int]]) -> float:
        if prepared[0][1] < 0:
            return 0.0
        best = math.inf
        for bound, k in prepared:
            if bound > best:
                break
            best = min(best, solve_strategy(self.tables[k], lengths, self.config).est_step_seconds)
        return best

    # -- windows --------------------------------------------------------------------------------------
    def plan(
        self,
        lengths: np.ndarray | Sequence[int],
        step_of: np.ndarray | Sequence[int],
        *,
        tokens_per_step: int | None = None,
        num_steps: int | None = None,
    ) -> WindowPlan:
        """Regroup one window. ``lengths``: tokens of every sequence of the window, in window
        order; ``step_of``: the sampled step (``0..k−1``) of each; ``tokens_per_step``: the
        token budget (``None``: fixed sequence counts, see the module docstring)."""
        s = np.ascontiguousarray(lengths, dtype=np.int64)
        sampled = np.ascontiguousarray(step_of, dtype=np.int64)
        k = int(num_steps if num_steps is not None else (sampled.max() + 1 if sampled.size else 0))
        if s.ndim != 1 or sampled.shape != s.shape:
            raise ValueError(f"lengths and step_of must be 1-D of one size, got {s.shape} and {sampled.shape}")
        if s.size and (s.min() < 1 or sampled.min() < 0 or sampled.max() >= k):
            raise ValueError(f"lengths must be >= 1 token and step_of in 0..{k - 1}")
        counts = np.bincount(sampled, minlength=k)
        if k and counts.min() == 0:
            raise ValueError(f"step {int(np.argmin(counts))} of the window has no sequence; every step needs one")
        band, frozen, proposals = window_proposals(s, sampled, k, tokens_per_step, self.config.lookahead_epsilon)
        sampled_est = np.array([self.estimate(s[sampled == t]) for t in range(k)])
        cache = {_key(s[sampled == t]): float(sampled_est[t]) for t in range(k)}
        tokens = np.bincount(sampled, weights=s, minlength=k)
        out_of_band = (tokens < band[0]) | (tokens > band[1])
        best = WindowPlan(sampled.copy(), sampled_est, sampled_est, "sampled", band, out_of_band)
        best_total = float(sampled_est.sum())
        for name, new in proposals:
            steps = [np.ascontiguousarray(s[new == t]) for t in range(k)]
            keys = [_key(x) for x in steps]
            bounds = [None if key in cache else self._bounds(x) for key, x in zip(keys, steps)]
            floor = sum(cache[key] if b is None else b[0][0] for key, b in zip(keys, bounds))
            if floor >= best_total:  # the quick bounds already rule it out: skip both stages
                continue
            est = np.zeros(k)
            for t in range(k):
                if bounds[t] is not None:
                    cache[keys[t]] = self._solve(steps[t], bounds[t])  # type: ignore[arg-type]
                est[t] = cache[keys[t]]
                if est.sum() >= best_total:
                    break
            if est.sum() < best_total:
                best, best_total = WindowPlan(new, est, sampled_est, name, band, frozen), float(est.sum())
        return best


def _key(lengths: np.ndarray) -> bytes:
    """A step's contents up to order (the estimate does not depend on the order)."""
    return np.sort(lengths).tobytes()


