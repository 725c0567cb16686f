"""The candidate pool: every candidate scored on sampled batches, the best K kept.

Both balancer stages run on sampled batches for every candidate of
:mod:`balancer.candidates`. The pool is chosen the way the selector uses it: start from
the best candidate that holds the longest sequence, then repeatedly add the candidate that
lowers the mean over batches of the per-batch best estimate the most; remaining slots go
to the best stand-alone scores. Pools are saved as JSON (:func:`save_candidates`).

Besides the mixes for the average step (:func:`balancer.candidates.heterogeneous_mixes`
on the profile), ``regime_mixes`` adds mixes for steps unlike it — the profile with its
long buckets scaled ×2 and ×4, and the steps of sampled windows regrouped the way
look-ahead regroups them — and ``lookahead_steps`` also scores every candidate on those
regrouped steps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from strategies.layout import ClusterSpec, Layout, Strategy

from .candidates import CandidateConfig, enumerate_layouts, heterogeneous_mixes
from .cost import CostModel
from .histogram import LengthHistogram, check_lengths
from .lookahead import window_proposals
from .solve import solve_strategy
from .stage1 import ReplicaTable

__all__ = ["CandidatePool", "generate_candidates", "load_candidates", "save_candidates"]

_POOL_VERSION = 1


@dataclass(kw_only=True)
class CandidatePool:
    """The scored candidate strategies, best first. JSON via :meth:`to_dict` / :meth:`from_dict`."""

    strategies: tuple[Strategy, ...]
    expected_seconds: tuple[float | None, ...]
    """Mean estimated step seconds over the sampled batches it holds (None: held none).
    ``meta["coverage"]``: the fraction of sampled batches each candidate holds;
    ``meta["capacity"]``: its longest sequence (tokens) — below ``max_length``, the mean
    skips the batches with longer sequences and is not comparable with the others."""
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


def _draw_batch(
    rng: np.random.Generator, source: np.ndarray | LengthHistogram, config: CandidateConfig, size: int, max_length: int
) -> np.ndarray:
    if isinstance(source, LengthHistogram):
        s = source.sample(rng, size)
    else:
        s = rng.choice(source, size=size, replace=True)
    if config.batch_tokens is not None:  # trim to the token budget, keeping at least one sequence
        keep = max(1, int(np.searchsorted(np.cumsum(s), config.batch_tokens, side="right")))
        s = s[:keep]
    return np.minimum(s, max_length).astype(np.int64)


def _draw_full_batch(
    rng: np.random.Generator, source: np.ndarray | LengthHistogram, config: CandidateConfig, size: int, max_length: int
) -> np.ndarray:
    """A batch cut as the loader's sampler cuts one: sequences while the next one fits the
    token budget (at least one), or exactly ``batch_size`` sequences."""
    if config.batch_tokens is None:
        return _draw_batch(rng, source, config, size, max_length)
    parts: list[np.ndarray] = []
    total = 0
    while total <= config.batch_tokens:
        chunk = source.sample(rng, size) if isinstance(source, LengthHistogram) else rng.choice(source, size=size, replace=True)
        chunk = np.minimum(chunk, max_length).astype(np.int64)
        parts.append(chunk)
        total += int(chunk.sum())
    s = np.concatenate(parts)
    keep = max(1, int(np.searchsorted(np.cumsum(s), config.batch_tokens, side="right")))
    return s[:keep]


def _batch_size(config: CandidateConfig, mean_length: float) -> int:
    if config.batch_size is not None:
        return config.batch_size
    assert config.batch_tokens is not None
    return max(1, math.ceil(config.batch_tokens / mean_length))


def _sample_batches(
    source: np.ndarray | LengthHistogram, config: CandidateConfig, mean_length: float, max_length: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(config.seed)
    size = _batch_size(config, mean_length)
    return [_draw_batch(rng, source, config, size, max_length) for _ in range(config.num_sample_batches)]


_REGIME_WINDOW = 4
"""Window (batches) of the regrouped samples whose mixes join every pool, look-ahead or not."""


def _sample_regrouped(
    source: np.ndarray | LengthHistogram, config: CandidateConfig, mean_length: float, max_length: int
) -> list[tuple[str, int, np.ndarray]]:
    """The steps look-ahead would form: windows of ``lookahead_steps`` (else
    :data:`_REGIME_WINDOW`) sampled batches, each regrouped by every proposal of
    :func:`balancer.lookahead.propose` (about ``num_sample_batches`` batches per proposal),
    as ``(proposal, step in the proposal, lengths)``. Their step histograms give mixes for
    steps richer or poorer in long sequences than the average; they are scored only when
    look-ahead is on."""
    k = config.lookahead_steps if config.lookahead_steps >= 2 else _REGIME_WINDOW
    rng = np.random.default_rng([config.seed, k])
    size = _batch_size(config, mean_length)
    out: list[tuple[str, int, np.ndarray]] = []
    for _ in range(max(1, config.num_sample_batches // k)):
        batches = [_draw_full_batch(rng, source, config, size, max_length) for _ in range(k)]
        lengths = np.concatenate(batches)
        sampled = np.repeat(np.arange(k), [b.size for b in batches])
        _, frozen, proposals = window_proposals(lengths, sampled, k, config.batch_tokens, config.lookahead_epsilon)
        for name, step_of in proposals:
            # steps in the proposal's own order (sorted: longest first), frozen ones left out
            order = sorted({int(t) for t in step_of if not frozen[t]}, key=lambda t: -int(lengths[step_of == t].max()))
            out.extend((name, j, lengths[step_of == t]) for j, t in enumerate(order))
    return out


def _regrouped_mixes(
    regrouped: list[tuple[str, int, np.ndarray]],
    num_ranks: int,
    cost_model: CostModel,
    layouts: Sequence[Layout],
    config: CandidateConfig,
) -> list[list[tuple[Layout, int]]]:
    """Mixes for the compositions look-ahead forms, and that a step sampling several long
    sequences (or none) has: one histogram per (proposal, step) over the sampled windows
    (``sorted`` proposals: the long-sequence steps, the short-only ones)."""
    by_step: dict[tuple[str, int], list[np.ndarray]] = {}
    for name, t, lengths in regrouped:
        if name.startswith("sorted"):
            by_step.setdefault((name, t), []).append(lengths)
    out: list[list[tuple[Layout, int]]] = []
    for key in sorted(by_step):
        parts = by_step[key]
        hist = LengthHistogram.from_lengths(np.concatenate(parts), config.num_buckets)
        per_step = float(np.mean([p.size for p in parts]))
        out += heterogeneous_mixes(
            hist, num_ranks, cost_model, layouts, sequences_per_step=per_step, max_classes=config.max_classes
        )
    return out


def _tail_mixes(
    hist: LengthHistogram, num_ranks: int, cost_model: CostModel, layouts: Sequence[Layout], config: CandidateConfig
) -> list[list[tuple[Layout, int]]]:
    """Mixes for steps richer in long sequences than the average one (a step that sampled
    several): the histogram with the long buckets' counts (above twice the median length)
    scaled by 2 and 4, at the same tokens per step."""
    cum = np.cumsum(hist.counts)
    median_bucket = int(np.searchsorted(cum, cum[-1] / 2.0))
    median = float(hist.bucket_max[median_bucket]) if hist.counts[median_bucket] else float(hist.edges[median_bucket + 1])
    long = hist.bucket_max > 2.0 * median
    out: list[list[tuple[Layout, int]]] = []
    if not long.any():
        return out
    for f in _TAIL_SCALES:
        scale = np.where(long, f, 1.0)
        scaled = LengthHistogram(
            edges=hist.edges,
            counts=np.rint(hist.counts * scale * 1000).astype(np.int64),
            sum_tokens=hist.sum_tokens * scale * 1000,
            sum_sq_tokens=hist.sum_sq_tokens * scale * 1000,
            bucket_max=hist.bucket_max,
        )
        if config.batch_tokens is not None:
            per_step = config.batch_tokens / scaled.mean_length
        else:
            per_step = float(config.batch_size or 1)
        out += heterogeneous_mixes(
            scaled, num_ranks, cost_model, layouts, sequences_per_step=per_step, max_classes=config.max_classes
        )
    return out


_TAIL_SCALES = (2.0, 4.0)


def _score(
    strategies: list[Strategy], cluster: ClusterSpec, cost_model: CostModel, batches: list[np.ndarray]
) -> np.ndarray:
    """float64[C, S]: estimated step seconds of every candidate on every batch (inf: cannot hold it)."""
    out = np.full((len(strategies), len(batches)), np.inf)
    for c, strat in enumerate(strategies):
        table = ReplicaTable.build(strat, cost_model, cluster.speed)
        for k, lengths in enumerate(batches):
            if int(lengths.max()) <= table.max_capacity:
                out[c, k] = solve_strategy(table, lengths).est_step_seconds
    return out


def _select(scores: np.ndarray, holds_longest: np.ndarray, k: int, filler: np.ndarray | None = None) -> list[int]:
    """Greedy pool: best full-coverage candidate first, then the largest drop of the per-batch best;
    free slots go to the best stand-alone means among ``filler`` (default: every candidate).
    Every candidate costs the selector time when its bound does not prune it, so a regime
    mix that lowers no batch's best estimate is not kept as a filler."""
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
    ok = np.ones(scores.shape[0], dtype=bool) if filler is None else filler
    rest = [
        int(c) for c in np.argsort(finite_mean, kind="stable") if int(c) not in chosen and np.isfinite(finite_mean[c]) and ok[c]
    ]
    chosen.extend(rest[: k - len(chosen)])
    return chosen


def generate_candidates(
    lengths: np.ndarray | Sequence[int] | LengthHistogram | Any,
    cluster: ClusterSpec,
    cost_model: CostModel,
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
        source = check_lengths(lengths)
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

    batches = _sample_batches(source, cfg, hist.mean_length, max_length)
    regrouped = _sample_regrouped(source, cfg, hist.mean_length, max_length) if cfg.regime_mixes or cfg.lookahead_steps >= 2 else []
    if cfg.lookahead_steps >= 2:  # score on the steps look-ahead forms too
        batches += [lengths for _, _, lengths in regrouped]

    mixes: list[list[tuple[Layout, int]]] = [[(lay, cluster.num_ranks // lay.size)] for lay in layouts]
    mixes += heterogeneous_mixes(
        hist, cluster.num_ranks, cost_model, layouts, sequences_per_step=per_step, max_classes=cfg.max_classes
    )
    num_average = len(mixes)  # the mixes after this serve other regimes: they enter only by lowering the scores
    if cfg.regime_mixes or cfg.lookahead_steps >= 2:
        mixes += _regrouped_mixes(regrouped, cluster.num_ranks, cost_model, layouts, cfg)
    if cfg.regime_mixes:
        mixes += _tail_mixes(hist, cluster.num_ranks, cost_model, layouts, cfg)
    strategies: list[Strategy] = []
    average: list[bool] = []
    seen: set[frozenset[tuple[Layout, int]]] = set()
    rejected: list[str] = []
    for m, mix in enumerate(mixes):
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
        average.append(m < num_average)

    scores = _score(strategies, cluster, cost_model, batches)
    caps = np.array([max(int(cost_model.token_capacity(r.layout)) for r in s.replicas) for s in strategies])
    chosen = _select(scores, caps >= max_length, cfg.num_candidates, np.asarray(average, dtype=bool))
    expected = []
    for c in chosen:
        row = scores[c][np.isfinite(scores[c])]
        expected.append(float(row.mean()) if row.size else None)
    coverage = [float(np.isfinite(scores[c]).mean()) for c in chosen]
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
            "num_scored_batches": len(batches),
            "lookahead_steps": cfg.lookahead_steps,
            "seed": cfg.seed,
            "batch_tokens": cfg.batch_tokens,
            "batch_size": cfg.batch_size,
            "coverage": coverage,
            "capacity": [int(caps[c]) for c in chosen],
        },
    )
