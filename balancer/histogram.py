"""Length histograms: a dataset's length distribution in buckets, for candidate generation.

A :class:`LengthHistogram` is what :func:`balancer.pool.generate_candidates` plans from
when it has no raw lengths: bucket edges (tokens), counts, and per-bucket sums of ``s`` and
``s²`` so expected per-step work ``Σ a·s² + b·s`` is exact per bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["LengthHistogram", "check_lengths"]


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
        s = check_lengths(lengths)
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


def check_lengths(lengths: np.ndarray | Sequence[int]) -> np.ndarray:
    s = np.asarray(lengths)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"lengths must be a non-empty 1-D array of token counts, got shape {s.shape}")
    if s.dtype.kind not in "iu":
        raise ValueError(f"lengths must be integers (tokens), got dtype {s.dtype}")
    bad = np.flatnonzero(s <= 0)
    if bad.size:
        raise ValueError(f"lengths[{int(bad[0])}] = {int(s[bad[0]])}; every sequence has at least 1 token")
    return s.astype(np.int64)
