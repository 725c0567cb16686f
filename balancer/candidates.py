"""Candidate strategies for the per-step selector, generated offline from the length profile.

Hydraulis (arXiv 2412.07894) keeps a small pool of parallel strategies and picks one per
step. The pool comes from the dataset's length distribution:

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
4. **Scoring**: both balancer stages run on sampled batches for every candidate (the
   balancer is imported lazily, so this module stays a leaf). The pool is chosen the way
   the selector uses it: start from the best candidate that holds the longest sequence,
   then repeatedly add the candidate that lowers the mean over batches of the per-batch
   best estimate the most; remaining slots go to the best stand-alone scores.

The cost model is passed in as an object with ``.cost(layout)`` (``a, b, c,
token_capacity``), ``.token_capacity(layout)`` and ``.seconds(lengths, layout)``, e.g.
:class:`balancer.cost.CostModel`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from .layout import ClusterSpec, Layout, Strategy

__all__ = [
    "CandidateConfig",
    "CandidatePool",
    "LengthHistogram",
    "enumerate_layouts",
    "generate_candidates",
    "heterogeneous_mixes",
    "load_candidates",
    "save_candidates",
]

_POOL_VERSION = 1


class CostModelLike(Protocol):
    """What candidate generation needs from a cost model (``balancer.cost.CostModel`` has it)."""

    def cost(self, layout: Layout) -> Any:
        """Coefficients ``a, b, c`` (seconds) and ``token_capacity`` (tokens); ``ValueError`` if unpriceable."""

    def token_capacity(self, layout: Layout) -> int:
        """Most tokens one micro-batch of ``layout`` holds."""


# -- length profile -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LengthHistogram:
    """Length distribution in buckets ``(edges[b], edges[b+1]]`` (tokens)."""

    edges: np.ndarray
    """int64[B+1], increasing, ``edges[0] >= 0``."""
    counts: np.ndarray
    """int64[B], sequences per bucket."""
    sum_tokens: np.ndarray
    """float64[B], Σ s per bucket."""
    sum_sq_tokens: np.ndarray
    """float64[B], Σ s² per bucket (attention work)."""
    bucket_max: np.ndarray
    """int64[B], longest sequence per bucket (0 for an empty bucket)."""

    def __post_init__(self) -> None:
        e = np.asarray(self.edges, dtype=np.int64)
        c = np.asarray(self.counts, dtype=np.int64)
        if e.ndim != 1 or e.size < 2 or np.any(np.diff(e) <= 0) or e[0] < 0:
            raise ValueError(f"LengthHistogram: edges {e.tolist()[:8]} must be >= 0 and strictly increasing")
        if c.shape != (e.size - 1,) or np.any(c < 0) or c.sum() == 0:
            raise ValueError(f"LengthHistogram: counts must be {e.size - 1} non-negative integers with a positive total")
        object.__setattr__(self, "edges", e)
        object.__setattr__(self, "counts", c)
        for name in ("sum_tokens", "sum_sq_tokens"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        object.__setattr__(self, "bucket_max", np.asarray(self.bucket_max, dtype=np.int64))

    @classmethod
    def from_lengths(cls, lengths: np.ndarray | Sequence[int], num_buckets: int = 32) -> "LengthHistogram":
        """Geometric buckets from 1 token to the longest length."""
        s = _check_lengths(lengths)
        top = int(s.max())
        edges = np.unique(np.ceil(np.geomspace(1.0, float(top), num_buckets + 1)).astype(np.int64))
        edges = np.concatenate(([0], edges[edges > 0]))
        b = np.searchsorted(edges, s, side="left") - 1
        nb = edges.size - 1
        bucket_max = np.zeros(nb, dtype=np.int64)
        np.maximum.at(bucket_max, b, s)
        sf = s.astype(np.float64)
        return cls(
            edges=edges,
            counts=np.bincount(b, minlength=nb),
            sum_tokens=np.bincount(b, weights=sf, minlength=nb),
            sum_sq_tokens=np.bincount(b, weights=sf * sf, minlength=nb),
            bucket_max=bucket_max,
        )

    @classmethod
    def from_counts(cls, edges: Sequence[int], counts: Sequence[int]) -> "LengthHistogram":
        """From bucket counts only; lengths are taken as uniform inside each bucket."""
        e = np.asarray(edges, dtype=np.int64)
        c = np.asarray(counts, dtype=np.int64)
        lo, hi = e[:-1].astype(np.float64) + 1.0, e[1:].astype(np.float64)
        mean = (lo + hi) / 2.0
        # E[s²] of a discrete uniform on lo..hi.
        mean_sq = mean * mean + ((hi - lo + 1.0) ** 2 - 1.0) / 12.0
        return cls(
            edges=e,
            counts=c,
            sum_tokens=c * mean,
            sum_sq_tokens=c * mean_sq,
            bucket_max=np.where(c > 0, e[1:], 0),
        )

    @classmethod
    def from_profile(cls, profile: Any) -> "LengthHistogram":
        """From a ``balancer.profile.LengthProfile`` (buckets ``[edges[b], edges[b+1])``, with
        per-bucket ``tokens`` and ``square_tokens``), read by attribute so no import is needed."""
        e = np.asarray(profile.edges, dtype=np.int64)
        counts = np.asarray(profile.counts, dtype=np.int64)
        top = np.minimum(e[1:] - 1, int(profile.max_length))
        return cls(
            edges=e - 1,  # [e_b, e_{b+1}) == (e_b - 1, e_{b+1} - 1] for integer lengths
            counts=counts,
            sum_tokens=np.asarray(profile.tokens, dtype=np.float64),
            sum_sq_tokens=np.asarray(profile.square_tokens, dtype=np.float64),
            bucket_max=np.where(counts > 0, top, 0),
        )

    @property
    def max_length(self) -> int:
        return int(self.bucket_max.max())

    @property
    def mean_length(self) -> float:
        return float(self.sum_tokens.sum() / self.counts.sum())

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` lengths drawn from the histogram (uniform inside a bucket), int64."""
        p = self.counts / self.counts.sum()
        b = rng.choice(p.size, size=size, p=p)
        lo = self.edges[b] + 1
        hi = np.maximum(self.bucket_max[b], lo)
        return rng.integers(lo, hi + 1).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": self.edges.tolist(),
            "counts": self.counts.tolist(),
            "sum_tokens": self.sum_tokens.tolist(),
            "sum_sq_tokens": self.sum_sq_tokens.tolist(),
            "bucket_max": self.bucket_max.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LengthHistogram":
        return cls(**{k: np.asarray(d[k]) for k in ("edges", "counts", "sum_tokens", "sum_sq_tokens", "bucket_max")})

    def clipped(self, max_length: int) -> "LengthHistogram":
        """Lengths above ``max_length`` counted as ``max_length`` (what truncation would leave)."""
        if self.max_length <= max_length:
            return self
        keep = self.edges[1:] < max_length
        nb = int(keep.sum()) + 1
        edges = np.concatenate((self.edges[:nb], [max_length]))
        counts = np.concatenate((self.counts[: nb - 1], [self.counts[nb - 1 :].sum()]))
        # Tail bucket: its sequences sit anywhere up to max_length, the clipped ones exactly at it.
        over = self.counts[nb - 1 :]
        tail_mean = np.minimum(self.sum_tokens[nb - 1 :] / np.maximum(over, 1), max_length)
        tail_sum = float((over * tail_mean).sum())
        tail_sq = float((over * tail_mean * tail_mean).sum())
        return LengthHistogram(
            edges=edges,
            counts=counts,
            sum_tokens=np.concatenate((self.sum_tokens[: nb - 1], [tail_sum])),
            sum_sq_tokens=np.concatenate((self.sum_sq_tokens[: nb - 1], [tail_sq])),
            bucket_max=np.concatenate((self.bucket_max[: nb - 1], [max_length])),
        )


def _check_lengths(lengths: np.ndarray | Sequence[int]) -> np.ndarray:
    s = np.asarray(lengths)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D array of token counts, got shape {s.shape}")
    if s.dtype.kind not in "iu":
        raise ValueError(f"lengths must be integers (tokens), got dtype {s.dtype}")
    bad = np.flatnonzero(s <= 0)
    if bad.size:
        raise ValueError(f"lengths[{int(bad[0])}] = {int(s[bad[0]])}; every sequence has at least 1 token")
    return s.astype(np.int64)


# -- configuration ------------------------------------------------------------------------------


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"CandidateConfig: seed={self.seed!r} must be an integer >= 0")


# -- layouts ----------------------------------------------------------------------------------------


def _prices(cost_model: CostModelLike, layout: Layout) -> Any | None:
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
    cost_model: CostModelLike,
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
            no_worse = oc.a <= cost.a and oc.b <= cost.b and oc.c <= cost.c and oc.token_capacity >= cost.token_capacity
            better = oc.a < cost.a or oc.b < cost.b or oc.c < cost.c or oc.token_capacity > cost.token_capacity
            if no_worse and (better or other < lay):
                dominated = True
                break
        if not dominated:
            keep.append(lay)
    return sorted(keep, key=lambda x: (x.size, x.tp, x.cp, x.pp))


# -- heterogeneous mixes (DP) -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Class:
    layout: Layout
    size: int
    capacity: int
    a: float
    b: float
    c: float


def _classes(cost_model: CostModelLike, layouts: Sequence[Layout]) -> list[_Class]:
    out = []
    for lay in layouts:
        cost = cost_model.cost(lay)
        out.append(_Class(lay, lay.size, int(cost.token_capacity), float(cost.a), float(cost.b), float(cost.c)))
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
        per_seq = k.a * m2 + k.b * m1 + k.c * m1 / k.capacity
        for i in range(J + 1):
            if caps[i] >= k.capacity:
                continue
            sel = (hist.counts > 0) & (top > caps[i]) & (top <= k.capacity)
            W[i, j] = float((share[sel] * per_seq[sel]).sum())
            if sel.any():
                b = int(np.flatnonzero(sel)[-1])
                Q[i, j] = (k.a * top[b] ** 2 + k.b * top[b] + k.c) * min(1.0, float(share[b]))
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
    cost_model: CostModelLike,
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


# -- scoring and the pool ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class CandidatePool:
    """The scored candidate strategies, best first. JSON via :meth:`to_dict` / :meth:`from_dict`."""

    strategies: tuple[Strategy, ...]
    expected_seconds: tuple[float | None, ...]
    """Mean estimated step seconds over the sampled batches it holds (None: held none)."""
    max_length: int
    """Longest sequence (tokens) the pool was built to hold."""
    num_ranks: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.strategies = tuple(self.strategies)
        self.expected_seconds = tuple(None if x is None else float(x) for x in self.expected_seconds)
        if not self.strategies:
            raise ValueError("CandidatePool: no strategies")
        if len(self.expected_seconds) != len(self.strategies):
            raise ValueError("CandidatePool: one expected_seconds entry per strategy")
        for s in self.strategies:
            if s.num_ranks != self.num_ranks:
                raise ValueError(f"CandidatePool: strategy {s.name!r} covers {s.num_ranks} ranks, pool is for {self.num_ranks}")

    def check_cluster(self, cluster: ClusterSpec) -> None:
        """Raise ``ValueError`` naming the first strategy that does not fit ``cluster``."""
        for s in self.strategies:
            s.check_cluster(cluster)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": _POOL_VERSION,
            "num_ranks": self.num_ranks,
            "max_length": self.max_length,
            "strategies": [s.to_dict() for s in self.strategies],
            "expected_seconds": list(self.expected_seconds),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CandidatePool":
        if int(d.get("version", -1)) != _POOL_VERSION:
            raise ValueError(f"candidate pool version {d.get('version')!r} is not supported (expected {_POOL_VERSION})")
        return cls(
            strategies=tuple(Strategy.from_dict(s) for s in d["strategies"]),
            expected_seconds=tuple(d["expected_seconds"]),
            max_length=int(d["max_length"]),
            num_ranks=int(d["num_ranks"]),
            meta=dict(d.get("meta", {})),
        )


def save_candidates(pool: CandidatePool, path: str | Path) -> None:
    """Write the pool as JSON."""
    Path(path).write_text(json.dumps(pool.to_dict(), indent=2) + "\n")


def load_candidates(path: str | Path, cluster: ClusterSpec | None = None) -> CandidatePool:
    """Read a pool written by :func:`save_candidates`; with ``cluster``, check every strategy fits it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"candidate file {str(p)!r} does not exist; generate one with generate_candidates()")
    try:
        pool = CandidatePool.from_dict(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"candidate file {str(p)!r} is not valid JSON: {e}") from None
    if cluster is not None:
        pool.check_cluster(cluster)
    return pool


def _sample_batches(
    source: np.ndarray | LengthHistogram, config: CandidateConfig, mean_length: float, max_length: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(config.seed)
    if config.batch_size is not None:
        size = config.batch_size
    else:
        assert config.batch_tokens is not None
        size = max(1, math.ceil(config.batch_tokens / mean_length))
    out = []
    for _ in range(config.num_sample_batches):
        if isinstance(source, LengthHistogram):
            s = source.sample(rng, size)
        else:
            s = rng.choice(source, size=size, replace=True)
        if config.batch_tokens is not None:  # trim to the token budget, keeping at least one sequence
            keep = max(1, int(np.searchsorted(np.cumsum(s), config.batch_tokens, side="right")))
            s = s[:keep]
        out.append(np.minimum(s, max_length).astype(np.int64))
    return out


def _score(
    strategies: list[Strategy], cluster: ClusterSpec, cost_model: CostModelLike, batches: list[np.ndarray]
) -> np.ndarray:
    """float64[C, S]: estimated step seconds of every candidate on every batch (inf: cannot hold it)."""
    from balancer.dispatch import ReplicaTable  # lazy: strategies stays a leaf package
    from balancer.selector import solve_strategy

    out = np.full((len(strategies), len(batches)), np.inf)
    for c, strat in enumerate(strategies):
        table = ReplicaTable.build(strat, cost_model, cluster.speed)  # type: ignore[arg-type]
        for k, lengths in enumerate(batches):
            if int(lengths.max()) <= table.max_capacity:
                out[c, k] = solve_strategy(table, lengths).est_step_seconds
    return out


def _select(scores: np.ndarray, holds_longest: np.ndarray, k: int) -> list[int]:
    """Greedy pool: best full-coverage candidate first, then the largest drop of the per-batch best."""
    finite_mean = np.array([row[np.isfinite(row)].mean() if np.isfinite(row).any() else np.inf for row in scores])
    first_pool = np.flatnonzero(holds_longest & np.isfinite(scores).all(axis=1))
    if first_pool.size == 0:
        first_pool = np.flatnonzero(holds_longest)
    first = int(first_pool[np.argmin(finite_mean[first_pool])])
    chosen = [first]
    current = scores[first].copy()
    while len(chosen) < k:
        base = float(np.mean(current))
        gains = np.array([base - float(np.mean(np.minimum(current, row))) for row in scores])
        gains[chosen] = -np.inf
        c = int(np.argmax(gains))
        if not gains[c] > 0:
            break
        chosen.append(c)
        current = np.minimum(current, scores[c])
    rest = [int(c) for c in np.argsort(finite_mean, kind="stable") if int(c) not in chosen and np.isfinite(finite_mean[c])]
    chosen.extend(rest[: k - len(chosen)])
    return chosen


def generate_candidates(
    lengths: np.ndarray | Sequence[int] | LengthHistogram | Any,
    cluster: ClusterSpec,
    cost_model: CostModelLike,
    config: CandidateConfig | None = None,
    **kwargs: Any,
) -> CandidatePool:
    """The K best candidate strategies for this length profile, cluster and cost model.

    ``lengths`` is a sample of sequence lengths (tokens), a :class:`LengthHistogram` or a
    ``balancer.profile.LengthProfile``;
    options are a :class:`CandidateConfig` or its fields as keyword arguments.
    """
    if config is not None and kwargs:
        raise ValueError("generate_candidates: pass either config or keyword options, not both")
    cfg = config if config is not None else CandidateConfig(**kwargs)
    if isinstance(lengths, LengthHistogram):
        hist, source = lengths, lengths
    elif hasattr(lengths, "square_tokens") and hasattr(lengths, "edges"):  # balancer.profile.LengthProfile
        hist = LengthHistogram.from_profile(lengths)
        source = hist
    else:
        source = _check_lengths(lengths)
        hist = LengthHistogram.from_lengths(source, cfg.num_buckets)
    layouts = enumerate_layouts(cluster, cost_model, allow_pp=cfg.allow_pp, max_pp=cfg.max_pp, max_cp=cfg.max_cp)
    if not layouts:
        raise ValueError(
            f"no layout fits: for {cluster.num_ranks} ranks ({cluster.ranks_per_node} per node) the cost model "
            "prices no power-of-two (tp, cp) layout; give the model more memory or more ranks"
        )
    largest = max(int(cost_model.token_capacity(lay)) for lay in layouts)
    max_length = cfg.max_length if cfg.max_length is not None else hist.max_length
    if max_length > largest:
        raise ValueError(
            f"the longest sequence to hold has {max_length} tokens, above the largest capacity {largest} of any "
            f"layout that fits ({', '.join(lay.name for lay in layouts)}); pass max_length<={largest} and let the "
            "loader's overlong policy truncate, split or drop longer ones, or allow a larger cp (max_cp) or more ranks"
        )
    hist = hist.clipped(max_length)
    per_step = (cfg.batch_tokens / hist.mean_length) if cfg.batch_tokens is not None else float(cfg.batch_size or 1)

    mixes: list[list[tuple[Layout, int]]] = [[(lay, cluster.num_ranks // lay.size)] for lay in layouts]
    mixes += heterogeneous_mixes(
        hist, cluster.num_ranks, cost_model, layouts, sequences_per_step=per_step, max_classes=cfg.max_classes
    )
    strategies: list[Strategy] = []
    seen: set[frozenset[tuple[Layout, int]]] = set()
    rejected: list[str] = []
    for mix in mixes:
        merged: dict[Layout, int] = {}
        for lay, n in mix:
            merged[lay] = merged.get(lay, 0) + n
        key = frozenset(merged.items())
        if key in seen:
            continue
        seen.add(key)
        strat = Strategy.from_counts(merged.items())
        try:
            strat.check_cluster(cluster)
        except ValueError as e:
            rejected.append(f"{strat.name}: {e}")
            continue
        strategies.append(strat)

    batches = _sample_batches(source, cfg, hist.mean_length, max_length)
    scores = _score(strategies, cluster, cost_model, batches)
    caps = np.array([max(int(cost_model.token_capacity(r.layout)) for r in s.replicas) for s in strategies])
    chosen = _select(scores, caps >= max_length, cfg.num_candidates)
    expected = []
    for c in chosen:
        row = scores[c][np.isfinite(scores[c])]
        expected.append(float(row.mean()) if row.size else None)
    return CandidatePool(
        strategies=tuple(strategies[c] for c in chosen),
        expected_seconds=tuple(expected),
        max_length=int(max_length),
        num_ranks=cluster.num_ranks,
        meta={
            "num_generated": len(strategies),
            "rejected": rejected,
            "layouts": [lay.name for lay in layouts],
            "sequences_per_step": per_step,
            "num_sample_batches": cfg.num_sample_batches,
            "seed": cfg.seed,
            "batch_tokens": cfg.batch_tokens,
            "batch_size": cfg.batch_size,
        },
    )
