"""Dataset profiles: what a corpus' length distribution looks like and where its time goes.

A :class:`LengthProfile` is a compact, JSON-serialisable summary of a length
distribution: counts and tokens per log-spaced length bucket (8 buckets per doubling,
so bucket edges are ~9% apart), quantiles and totals. It is what ``hydraulis profile``
writes and what ``hydraulis plan`` / ``simulate`` read when the raw lengths are not at
hand: :meth:`LengthProfile.sample` draws lengths from it (log-uniform inside a bucket).

Because attention grows with the square of the length, the share of *time* taken by
long sequences is far larger than their share of sequences or tokens;
:meth:`LengthProfile.time_share` shows this per bucket for a given cost model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["LengthProfile", "BUCKETS_PER_DOUBLING", "QUANTILES"]

BUCKETS_PER_DOUBLING = 8
"""Histogram resolution: 8 log-spaced buckets per doubling of length (edges ~9% apart)."""
QUANTILES = (0.5, 0.9, 0.99, 0.999)
PROFILE_VERSION = 1


def _bucket_edges(max_length: int) -> np.ndarray:
    """Integer bucket edges 1 = e_0 < e_1 < … with e_last > max_length (log-spaced, deduplicated)."""
    top = math.log2(max(2, max_length + 1))
    raw = np.exp2(np.arange(0, math.ceil(top * BUCKETS_PER_DOUBLING) + 2) / BUCKETS_PER_DOUBLING)
    edges = np.unique(np.ceil(raw).astype(np.int64))
    edges = edges[edges >= 1]
    if edges[0] != 1:
        edges = np.concatenate([[1], edges])
    if edges[-1] <= max_length:
        edges = np.concatenate([edges, [max_length + 1]])
    return edges


@dataclass(frozen=True)
class LengthProfile:
    """Histogram and summary of a length distribution (tokens per sequence)."""

    edges: np.ndarray
    """Bucket edges, int64, length B+1: bucket b holds lengths in [edges[b], edges[b+1])."""
    counts: np.ndarray
    """Sequences per bucket, int64 (B,)."""
    tokens: np.ndarray
    """Tokens per bucket, int64 (B,)."""
    square_tokens: np.ndarray
    """Σ s² per bucket, float64 (B,): the quadratic (attention) work per bucket."""
    num_sequences: int
    total_tokens: int
    min_length: int
    max_length: int
    quantiles: dict[str, int]
    """Exact quantiles of the lengths, e.g. ``{"p50": 347, "p90": 2112, ...}``."""
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_lengths(cls, lengths: np.ndarray, *, source: str = "", **meta: Any) -> "LengthProfile":
        """Profile an array of token lengths (all must be integers >= 1)."""
        arr = np.asarray(lengths)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"lengths must be a non-empty 1-D array, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.isfinite(arr)):
                i = int(np.flatnonzero(~np.isfinite(arr))[0])
                raise ValueError(f"length at index {i} is {arr[i]}; lengths must be finite integers")
            if not np.all(arr == np.round(arr)):
                i = int(np.flatnonzero(arr != np.round(arr))[0])
                raise ValueError(f"length at index {i} is {arr[i]}; lengths must be whole tokens")
        if arr.dtype.kind in "fu" and bool(np.any(arr >= 2**63)):  # int64 would wrap these round
            i = int(np.flatnonzero(arr >= 2**63)[0])
            raise ValueError(f"length at index {i} is {arr[i]}, out of range (at most 2**63 - 1); the lengths are corrupt")
        arr = arr.astype(np.int64)
        bad = np.flatnonzero(arr < 1)
        if bad.size:
            raise ValueError(f"length at index {int(bad[0])} is {int(arr[bad[0]])}; every length must be >= 1 token")
        edges = _bucket_edges(int(arr.max()))
        b = np.searchsorted(edges, arr, side="right") - 1
        nb = len(edges) - 1
        counts = np.bincount(b, minlength=nb).astype(np.int64)
        tokens = np.bincount(b, weights=arr, minlength=nb).astype(np.int64)
        sq = np.bincount(b, weights=arr.astype(np.float64) ** 2, minlength=nb)
        q = {f"p{_qname(p)}": int(np.quantile(arr, p, method="inverted_cdf")) for p in QUANTILES}
        return cls(
            edges=edges,
            counts=counts,
            tokens=tokens,
            square_tokens=sq,
            num_sequences=int(arr.size),
            total_tokens=int(arr.sum()),
            min_length=int(arr.min()),
            max_length=int(arr.max()),
            quantiles=q,
            source=source,
            meta=dict(meta),
        )

    @property
    def mean_length(self) -> float:
        return self.total_tokens / self.num_sequences

    def sample(self, n: int, *, seed: int = 0) -> np.ndarray:
        """Draw ``n`` lengths (int64): bucket by its count, then log-uniform inside the bucket."""
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        rng = np.random.default_rng(seed)
        p = self.counts / self.counts.sum()
        b = rng.choice(len(self.counts), size=n, p=p)
        lo = np.maximum(self.edges[b], self.min_length).astype(np.float64)
        hi = np.minimum(self.edges[b + 1] - 1, self.max_length).astype(np.float64)
        u = rng.random(n)
        out = np.floor(np.exp(np.log(lo) + u * (np.log(hi + 1) - np.log(lo)))).astype(np.int64)
        return np.clip(out, lo.astype(np.int64), hi.astype(np.int64))

    def time_share(self, a: float, b: float, d: float = 0.0) -> np.ndarray:
        """Share of total time ``Σ a·s² + b·s + d`` per bucket (float64, sums to 1; ``d`` per sequence)."""
        t = a * self.square_tokens + b * self.tokens.astype(np.float64) + d * self.counts.astype(np.float64)
        total = t.sum()
        return t / total if total > 0 else t

    def summary_rows(self) -> list[tuple[str, str]]:
        """(name, value) rows for a printed summary table."""
        rows = [
            ("sequences", f"{self.num_sequences:,}"),
            ("tokens", f"{self.total_tokens:,}"),
            ("mean length", f"{self.mean_length:,.0f}"),
            ("min length", f"{self.min_length:,}"),
        ]
        rows += [(k, f"{v:,}") for k, v in self.quantiles.items()]
        rows.append(("max length", f"{self.max_length:,}"))
        return rows

    # -- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        nz = np.flatnonzero(self.counts)
        return {
            "version": PROFILE_VERSION,
            "source": self.source,
            "num_sequences": self.num_sequences,
            "total_tokens": self.total_tokens,
            "min_length": self.min_length,
            "max_length": self.max_length,
            "mean_length": self.mean_length,
            "quantiles": dict(self.quantiles),
            "histogram": {
                "buckets_per_doubling": BUCKETS_PER_DOUBLING,
                "lo": self.edges[nz].tolist(),
                "hi": (self.edges[nz + 1] - 1).tolist(),
                "counts": self.counts[nz].tolist(),
                "tokens": self.tokens[nz].tolist(),
                "square_tokens": self.square_tokens[nz].tolist(),
            },
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LengthProfile":
        if int(d.get("version", -1)) != PROFILE_VERSION:
            raise ValueError(f"profile version {d.get('version')!r} is not supported (expected {PROFILE_VERSION})")
        h = d["histogram"]
        edges = _bucket_edges(int(d["max_length"]))
        nb = len(edges) - 1
        counts = np.zeros(nb, dtype=np.int64)
        tokens = np.zeros(nb, dtype=np.int64)
        sq = np.zeros(nb, dtype=np.float64)
        idx = np.searchsorted(edges, np.asarray(h["lo"], dtype=np.int64), side="right") - 1
        counts[idx] = h["counts"]
        tokens[idx] = h["tokens"]
        sq[idx] = h["square_tokens"]
        return cls(
            edges=edges,
            counts=counts,
            tokens=tokens,
            square_tokens=sq,
            num_sequences=int(d["num_sequences"]),
            total_tokens=int(d["total_tokens"]),
            min_length=int(d["min_length"]),
            max_length=int(d["max_length"]),
            quantiles={k: int(v) for k, v in d["quantiles"].items()},
            source=str(d.get("source", "")),
            meta=dict(d.get("meta", {})),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LengthProfile":
        p = Path(path)
        if p.is_dir():
            inside = p / "profile.json"
            if inside.is_file():  # the folder `hydraulis profile` wrote
                return cls.load(inside)
            raise ValueError(
                f"{str(p)!r} is a folder without a profile.json; pass the profile JSON file (`hydraulis profile DATA "
                "--out FOLDER` writes FOLDER/profile.json)"
            )
        if not p.exists():
            raise ValueError(f"profile file {str(p)!r} does not exist; create it with `hydraulis profile DATA`")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"{str(p)!r} is not a hydraulis profile JSON but a binary file (a dataset?); profile it first with "
                f"`hydraulis profile {p}` and pass the profile.json it writes, or give the data itself as --lengths {p}"
            ) from None
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{str(p)!r} is not a hydraulis profile JSON ({type(e).__name__}: {e}); create one with "
                f"`hydraulis profile DATA`, or give a data file as --lengths"
            ) from None


def _qname(p: float) -> str:
    s = f"{p * 100:g}"
    return s.replace(".", "")
