"""Candidate strategies for the per-step selector: layouts and heterogeneous mixes.

Hydraulis (arXiv 2412.07894) keeps a small pool of parallel strategies and picks one per
step. The pool comes from the dataset's length distribution; this module enumerates what
can go into it, :mod:`balancer.pool` scores and keeps the best:

1. **Layouts** (:func:`enumerate_layouts`): every ``Layout(tp, cp, pp)`` with power-of-two
   degrees, ``tp ≤ ranks_per_node`` and dividing the node, a size dividing the cluster,
   and a cost model that prices it (i.e. it fits memory). ``pp > 1`` is opt-in
   (``allow_pp``) because a runtime may not support pipelines. Among layouts of the same
   size, one that is no faster and holds no more tokens than another is dropped.
2. **Homogeneous** strategies: each layout repeated over the whole cluster.
3. **Heterogeneous mixes** (:func:`heterogeneous_mixes`): layout *classes* ordered by
   capacity; length buckets (sorted) go to the smallest chosen class that holds them, so
   the longest bucket gets the smallest layout that holds it. How many replicas each
   class gets is a dynamic programme that balances expected per-replica loads of a step:
   for a target load ``M`` the DP over (classes chosen so far, largest class chosen) finds
   the fewest ranks whose replicas keep every class's expected load ``≤ M``; a bisection
   finds the smallest ``M`` that fits the cluster, and spare ranks go to the most loaded
   classes. One mix per (largest class, number of classes) pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from strategies.layout import ClusterSpec, Layout

from .cost import CostModel
from .histogram import LengthHistogram

__all__ = ["CandidateConfig", "cluster_lower_bound", "enumerate_layouts", "heterogeneous_mixes"]


# -- configuration ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class CandidateConfig:
    """How candidates are generated. Give exactly one of ``batch_tokens`` and ``batch_size``."""

    batch_tokens: int | None = None
    """Tokens per global batch (one optimizer step), e.g. 1_048_576."""
    batch_size: int | None = None
    """Sequences per global batch."""
    num_candidates: int = 8
    """Pool size K kept after scoring."""
    max_length: int | None = None
    """Longest sequence the pool must hold, tokens (default: the profile's longest)."""
    allow_pp: bool = False
    """Also propose pipeline layouts (only if the runtime supports pp)."""
    max_pp: int = 8
    """Largest pipeline degree when ``allow_pp``."""
    max_cp: int | None = None
    """Largest context-parallel degree (default: the cluster size)."""
    max_classes: int = 3
    """Most distinct layouts in one heterogeneous mix."""
    num_buckets: int = 32
    """Length buckets of the profile (geometric)."""
    num_sample_batches: int = 8
    """Batches drawn to score candidates."""
    seed: int = 0
    """Seed of the batch sampling."""
    regime_mixes: bool = True
    """Also build mixes for steps holding more (or fewer) long sequences than the average
    one: the profile with its long buckets scaled ×2 and ×4, and the steps of sampled
    windows regrouped the way look-ahead regroups them (:mod:`balancer.pool`)."""
    lookahead_steps: int = 0
    """Score the candidates also on windows of this many sampled batches regrouped the way
    the look-ahead regroups them (:func:`balancer.lookahead.propose`), so the pool holds
    strategies for the steps look-ahead forms (long sequences together; short ones
    together). Use the value of ``BalancerConfig.lookahead_steps``; 0 or 1: off."""
    lookahead_epsilon: float = 0.1
    """Token band of those regrouped steps (``BalancerConfig.lookahead_epsilon``)."""

    def __post_init__(self) -> None:
        if (self.batch_tokens is None) == (self.batch_size is None):
            raise ValueError(
                "CandidateConfig: give exactly one of batch_tokens (tokens per step) and batch_size "
                f"(sequences per step); got batch_tokens={self.batch_tokens}, batch_size={self.batch_size}"
            )
        for name in ("batch_tokens", "batch_size", "max_length", "max_cp"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"CandidateConfig: {name}={v!r} must be a positive integer or None")
        for name in ("num_candidates", "max_pp", "max_classes", "num_buckets", "num_sample_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CandidateConfig: {name}={v!r} must be a positive integer")
        for name in ("seed", "lookahead_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"CandidateConfig: {name}={v!r} must be an integer >= 0")
        eps = self.lookahead_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 <= eps < 1.0):
            raise ValueError(f"CandidateConfig: lookahead_epsilon={eps!r} must be a number in [0, 1)")


# -- layouts ----------------------------------------------------------------------------------------


def _prices(cost_model: CostModel, layout: Layout) -> Any | None:
    supports = getattr(cost_model, "supports", None)
    try:
        if supports is not None and not supports(layout):
            return None
        cost = cost_model.cost(layout)
    except ValueError:
        return None  # the model cannot price it: e.g. weights and optimizer state do not fit
    return cost if int(cost.token_capacity) >= 1 else None


def enumerate_layouts(
    cluster: ClusterSpec,
    cost_model: CostModel,
    *,
    allow_pp: bool = False,
    max_pp: int = 8,
    max_cp: int | None = None,
) -> list[Layout]:
    """Layouts that fit the cluster and memory, minus same-size dominated ones, by (size, tp, cp, pp)."""
    n = cluster.num_ranks
    node = min(cluster.ranks_per_node, n)
    pows = [1 << i for i in range(n.bit_length()) if n % (1 << i) == 0]
    tps = [p for p in pows if p <= node and node % p == 0]
    cps = [p for p in pows if p <= (max_cp or n)]
    pps = [p for p in pows if p <= max_pp] if allow_pp else [1]
    found: list[tuple[Layout, Any]] = []
    for tp in tps:
        for cp in cps:
            for pp in pps:
                if n % (tp * cp * pp):
                    continue
                lay = Layout(tp=tp, cp=cp, pp=pp)
                cost = _prices(cost_model, lay)
                if cost is not None:
                    found.append((lay, cost))
    keep: list[Layout] = []
    for lay, cost in found:
        dominated = False
        for other, oc in found:
            if other == lay or other.size != lay.size:
                continue
            no_worse = (
                oc.a <= cost.a and oc.b <= cost.b and oc.c <= cost.c and oc.d <= cost.d
                and oc.token_capacity >= cost.token_capacity
            )
            better = oc.a < cost.a or oc.b < cost.b or oc.c < cost.c or oc.d < cost.d or oc.token_capacity > cost.token_capacity
            if no_worse and (better or other < lay):
                dominated = True
                break
        if not dominated:
            keep.append(lay)
    return sorted(keep, key=lambda x: (x.size, x.tp, x.cp, x.pp))


def cluster_lower_bound(
    lengths: np.ndarray | Sequence[int],
    cluster: ClusterSpec,
    cost_model: CostModel,
    layouts: Sequence[Layout] | None = None,
) -> float:
    """Seconds no plan of *any* strategy built from ``layouts`` can beat on this batch.

    Default ``layouts``: :func:`enumerate_layouts` (``pp = 1``). For a plan with step time
    ``M`` on a strategy of replicas ``j`` (``size_j`` ranks, layout ``k_j``, speed at most
    ``v = max(cluster.speed)``):

    * a sequence ``i`` sits on a layout that holds it alone within ``M``:
      ``pp_k·(t_k(s_i) + c_k)/v ≤ M`` (bound 1 of :func:`balancer.bounds.lower_bound`);
    * rank-seconds: ``G·M ≥ Σ_j size_j·T_j ≥ Σ_i size_k·w_k(s_i)/v`` with
      ``w = t + c·s/capacity`` (bound 4's micro-batch term) — at least
      ``Σ_i min over those layouts``.

    The right side falls as ``M`` grows, so the smallest ``M`` meeting both is found by
    bisection; the largest ``M`` proven impossible is returned. With ``N`` sequences and
    more small replicas than ``N``, this is what a strategy of fewer, larger replicas can
    reach: the test of the few-long-sequences regime compares plans against it.
    """
    s = np.asarray(lengths, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or s.min() < 1:
        raise ValueError("cluster_lower_bound: lengths must be a non-empty 1-D array of token counts >= 1")
    lays = list(layouts) if layouts is not None else enumerate_layouts(cluster, cost_model)
    if not lays:
        raise ValueError("cluster_lower_bound: no layout given and none fits the cluster")
    v = float(max(cluster.speed))
    single = np.full((s.size, len(lays)), np.inf)
    area = np.full((s.size, len(lays)), np.inf)
    for k, lay in enumerate(lays):
        cost = cost_model.cost(lay)
        ok = s <= int(cost.token_capacity)
        t = float(cost.a) * s * s + float(cost.b) * s + float(cost.d)  # t_k(s): the per-sequence term too
        single[ok, k] = lay.pp * (t[ok] + float(cost.c)) / v
        area[ok, k] = lay.size * (t[ok] + float(cost.c) * s[ok] / int(cost.token_capacity)) / v
    if not np.isfinite(single.min(axis=1)).all():
        i = int(np.flatnonzero(~np.isfinite(single.min(axis=1)))[0])
        raise ValueError(f"cluster_lower_bound: sequence {i} ({int(s[i])} tokens) fits no layout")
    ranks = float(cluster.num_ranks)

    def feasible(m: float) -> bool:
        need = np.where(single <= m, area, np.inf).min(axis=1)
        return bool(np.isfinite(need).all() and ranks * m >= need.sum())

    lo = float(single.min(axis=1).max()) * (1.0 - 1e-12)
    if feasible(lo):
        return lo
    hi = max(lo, float(np.where(np.isfinite(area), area, 0).max(axis=1).sum()) / ranks + float(single[np.isfinite(single)].max()))
    while not feasible(hi):
        hi *= 2.0
    for _ in range(100):
        if hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        if feasible(mid):
            hi = mid
        else:
            lo = mid
    return lo


# -- heterogeneous mixes (DP) -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Class:
    layout: Layout
    size: int
    capacity: int
    a: float
    b: float
    c: float
    d: float
    """Seconds per sequence."""


def _classes(cost_model: CostModel, layouts: Sequence[Layout]) -> list[_Class]:
    out = []
    for lay in layouts:
        cost = cost_model.cost(lay)
        out.append(
            _Class(lay, lay.size, int(cost.token_capacity), float(cost.a), float(cost.b), float(cost.c), float(cost.d))
        )
    return sorted(out, key=lambda k: (k.capacity, k.size, k.layout.tp, k.layout.cp, k.layout.pp))


def _range_loads(classes: list[_Class], hist: LengthHistogram, per_step: float) -> tuple[np.ndarray, np.ndarray]:
    """Expected work ``W[r, j]`` and single-item floor ``Q[r, j]`` (seconds per step) of class ``j``
    serving the buckets above a lower capacity and up to ``cap_j``: row ``r = 0`` starts at 0
    tokens, row ``r = i + 1`` above class ``i``'s capacity. ``inf`` where the range is empty
    by construction (lower capacity ``>= cap_j``)."""
    J = len(classes)
    share = hist.counts / hist.counts.sum() * per_step  # expected sequences per step per bucket
    safe = np.maximum(hist.counts, 1)
    m1, m2 = hist.sum_tokens / safe, hist.sum_sq_tokens / safe
    top = hist.bucket_max
    caps = np.array([0] + [k.capacity for k in classes], dtype=np.int64)
    W = np.full((J + 1, J), np.inf)
    Q = np.full((J + 1, J), np.inf)
    for j, k in enumerate(classes):
        per_seq = k.a * m2 + k.b * m1 + k.d + k.c * m1 / k.capacity
        for i in range(J + 1):
            if caps[i] >= k.capacity:
                continue
            sel = (hist.counts > 0) & (top > caps[i]) & (top <= k.capacity)
            W[i, j] = float((share[sel] * per_seq[sel]).sum())
            if sel.any():
                b = int(np.flatnonzero(sel)[-1])
                Q[i, j] = (k.a * top[b] ** 2 + k.b * top[b] + k.d + k.c) * min(1.0, float(share[b]))
            else:
                Q[i, j] = 0.0
    return W, Q


def _min_ranks(
    classes: list[_Class], W: np.ndarray, Q: np.ndarray, target: float, top: int, depth: int
) -> tuple[int, list[tuple[int, int]]] | None:
    """Fewest ranks so that every chosen class's expected load is ``≤ target``.

    DP over classes in capacity order: ``best[q][j]`` = fewest ranks covering all buckets up
    to ``cap_j`` with ``q`` classes, the largest being ``j``. Returns (ranks, [(class, count)]).
    """
    J = len(classes)
    inf = math.inf
    best = [[inf] * J for _ in range(depth + 1)]
    back: list[list[tuple[int, int] | None]] = [[None] * J for _ in range(depth + 1)]

    def count(i: int, j: int) -> int | None:
        if not (W[i, j] < inf) or Q[i, j] > target:
            return None
        return max(1, math.ceil(W[i, j] / target - 1e-12))

    for j in range(J):
        n = count(0, j)
        if n is not None:
            best[1][j], back[1][j] = n * classes[j].size, (-1, n)
    for q in range(2, depth + 1):
        for j in range(J):
            for i in range(j):
                if best[q - 1][i] == inf:
                    continue
                n = count(i + 1, j)
                if n is None:
                    continue
                r = best[q - 1][i] + n * classes[j].size
                if r < best[q][j]:
                    best[q][j], back[q][j] = r, (i, n)
    if best[depth][top] == inf:
        return None
    chain: list[tuple[int, int]] = []
    q, j = depth, top
    while j >= 0:
        i, n = back[q][j]  # type: ignore[misc]
        chain.append((j, n))
        q, j = q - 1, i
    return int(best[depth][top]), chain[::-1]


def _fill_spare(
    classes: list[_Class], W: np.ndarray, chain: list[tuple[int, int]], spare: int, smallest: _Class
) -> list[tuple[Layout, int]]:
    """Give spare ranks, replica by replica, to the chosen class with the highest expected load."""
    lower = [-1] + [j for j, _ in chain[:-1]]
    counts = {j: n for j, n in chain}
    work = {j: W[i + 1, j] for (j, _), i in zip(chain, lower)}
    extra_small = 0
    while spare > 0:
        fits = [j for j in counts if classes[j].size <= spare]
        if not fits:
            extra_small += spare // smallest.size
            break
        j = max(fits, key=lambda x: (work[x] / counts[x], -x))
        counts[j] += 1
        spare -= classes[j].size
    out = [(classes[j].layout, n) for j, n in counts.items()]
    if extra_small:
        out.append((smallest.layout, extra_small))
    return out


def heterogeneous_mixes(
    hist: LengthHistogram,
    num_ranks: int,
    cost_model: CostModel,
    layouts: Sequence[Layout],
    *,
    sequences_per_step: float,
    max_classes: int = 3,
) -> list[list[tuple[Layout, int]]]:
    """Layout counts ``[(layout, replicas)]`` of balanced mixes, one per (largest class, #classes).

    Every mix uses exactly ``num_ranks`` ranks and its largest layout holds ``hist.max_length``.
    """
    classes = _classes(cost_model, layouts)
    if not classes:
        return []
    W, Q = _range_loads(classes, hist, sequences_per_step)
    smallest = min(classes, key=lambda k: (k.size, k.capacity))
    if num_ranks % smallest.size:
        return []
    need = hist.max_length
    finite = np.concatenate((W[np.isfinite(W)], Q[np.isfinite(Q)]))
    loose = max(float(finite.max()) if finite.size else 1.0, 1e-12) * 2.0  # one replica per class meets it
    mixes: list[list[tuple[Layout, int]]] = []
    for top, k_top in enumerate(classes):
        if k_top.capacity < need:
            continue
        for depth in range(1, max_classes + 1):
            got = _min_ranks(classes, W, Q, loose, top, depth)
            if got is None or got[0] > num_ranks:
                continue  # these classes do not fit the cluster even with one replica each
            lo, hi = 0.0, loose
            while hi - lo > 1e-4 * hi:  # bisection on the target load, to 0.01%
                mid = (lo + hi) / 2.0
                trial = _min_ranks(classes, W, Q, mid, top, depth)
                if trial is not None and trial[0] <= num_ranks:
                    hi, got = mid, trial
                else:
                    lo = mid
            used, chain = got
            mixes.append(_fill_spare(classes, W, chain, num_ranks - used, smallest))
    return mixes
