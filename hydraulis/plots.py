"""PNG plots for the CLI (matplotlib, Agg backend; imported only when a plot is drawn).

* :func:`plot_length_histogram` — sequences per length bucket, log-log, quantiles marked;
* :func:`plot_time_share` — per doubling of length: share of sequences, of tokens and of
  estimated time (``a·s² + b·s``), which shows where attention makes long sequences costly;
* :func:`plot_simulation` — estimated step time per step for every policy, and the
  per-step imbalance (slowest over mean replica time).

:func:`doubling_shares` computes the numbers behind :func:`plot_time_share` (no plotting).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from balancer.profile import LengthProfile
    from balancer.simulation import SimulationResult

__all__ = [
    "BucketShares",
    "doubling_shares",
    "plot_length_histogram",
    "plot_simulation",
    "plot_time_share",
    "same_as_earlier",
]


@dataclass(frozen=True)
class BucketShares:
    """Per doubling of length: bucket bounds (tokens) and shares (fractions summing to 1)."""

    lo: np.ndarray
    """int64, first length of each bucket (a power of two, or the profile's minimum)."""
    hi: np.ndarray
    """int64, last length of each bucket."""
    sequences: np.ndarray
    tokens: np.ndarray
    time: np.ndarray

    def labels(self) -> list[str]:
        return [f"{_short(lo)}–{_short(hi)}" for lo, hi in zip(self.lo, self.hi)]

    def merge_leading(self, threshold: float = 0.01) -> "BucketShares":
        """Fold the buckets before the first one holding ``threshold`` of anything into a
        single bucket (a few stray 2-token rows should not widen a plot by five bars)."""
        big = np.maximum(np.maximum(self.sequences, self.tokens), self.time) >= threshold
        first = int(np.argmax(big)) if big.any() else 0
        if first < 2:
            return self

        def fold(x: np.ndarray) -> np.ndarray:
            return np.concatenate([[x[:first].sum()], x[first:]])

        return BucketShares(lo=_fold_ends(self.lo, first, 0), hi=_fold_ends(self.hi, first, first - 1),
                            sequences=fold(self.sequences), tokens=fold(self.tokens), time=fold(self.time))

    def above(self, length: int) -> tuple[float, float, float]:
        """Shares of sequences, tokens and time of the buckets starting at or above ``length``."""
        m = self.lo >= length
        return float(self.sequences[m].sum()), float(self.tokens[m].sum()), float(self.time[m].sum())


def _fold_ends(x: np.ndarray, first: int, keep: int) -> np.ndarray:
    """``x[keep]`` standing for ``x[:first]``, followed by ``x[first:]``."""
    return np.concatenate([[x[keep]], x[first:]])


def _short(n: int) -> str:
    n = int(n)
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    if n >= 1024 and (n + 1) % 1024 == 0:
        return f"{(n + 1) >> 10}K"
    return f"{n:,}"


def doubling_shares(profile: "LengthProfile", a: float, b: float, d: float = 0.0) -> BucketShares:
    """Group the profile's buckets by doubling of length, ``[2^k, 2^(k+1))``, and give each
    group's share of sequences, tokens and time ``Σ a·s² + b·s + d`` (seconds per token², per
    token and per sequence, any one unit). Empty groups are left out."""
    lo_edges = profile.edges[:-1]
    group = np.floor(np.log2(lo_edges)).astype(np.int64)
    keys = np.unique(group[profile.counts > 0])
    idx = np.searchsorted(keys, group)
    valid = (idx < keys.size) & (keys[np.minimum(idx, keys.size - 1)] == group) & (profile.counts > 0)
    k = keys.size
    counts = np.bincount(idx[valid], weights=profile.counts[valid], minlength=k)
    tokens = np.bincount(idx[valid], weights=profile.tokens[valid].astype(np.float64), minlength=k)
    square = np.bincount(idx[valid], weights=profile.square_tokens[valid], minlength=k)
    time = a * square + b * tokens + d * counts
    lo = np.maximum(np.left_shift(1, keys), profile.min_length)
    hi = np.minimum(np.left_shift(1, keys + 1) - 1, profile.max_length)

    def share(x: np.ndarray) -> np.ndarray:
        total = x.sum()
        return x / total if total > 0 else x

    return BucketShares(lo=lo, hi=hi, sequences=share(counts), tokens=share(tokens), time=share(time))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_length_histogram(profile: "LengthProfile", path: str | Path, title: str | None = None) -> Path:
    """Sequences per length bucket on log axes, with p50/p90/p99 and the maximum marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    nz = profile.counts > 0
    edges = profile.edges.astype(np.float64)
    ax.stairs(np.where(nz, profile.counts, np.nan), edges, fill=True, alpha=0.75, color="#3b75af")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("sequences per bucket (8 buckets per doubling)")
    ax.set_title(title or f"Length distribution: {profile.source or 'dataset'} ({profile.num_sequences:,} sequences)")
    marks = [(k, v) for k, v in profile.quantiles.items() if k in ("p50", "p90", "p99")]
    marks.append(("max", profile.max_length))
    colors = ["#2a9d3a", "#e0a000", "#d05a00", "#b0001e"]
    for (name, value), color in zip(marks, colors):
        ax.axvline(value, color=color, linestyle="--", linewidth=1)
        ax.text(value, 0.97, f" {name} {value:,}", transform=ax.get_xaxis_transform(), rotation=90,
                va="top", ha="right", fontsize=8, color=color)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_time_share(shares: BucketShares, path: str | Path, cost_label: str, title: str | None = None) -> Path:
    """Grouped bars per doubling of length: share of sequences, tokens and estimated time."""
    plt = _pyplot()
    shares = shares.merge_leading()
    n = shares.lo.size
    fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * n + 2), 4.5), dpi=110)
    x = np.arange(n)
    w = 0.27
    ax.bar(x - w, 100 * shares.sequences, w, label="sequences", color="#9bbbd9")
    ax.bar(x, 100 * shares.tokens, w, label="tokens", color="#3b75af")
    ax.bar(x + w, 100 * shares.time, w, label=f"estimated time ({cost_label})", color="#c8452c")
    ax.set_xticks(x, shares.labels(), rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("sequence length bucket (tokens)")
    ax.set_ylabel("share (%)")
    ax.set_title(title or "Where the time goes: attention makes long sequences cost more than their tokens")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")
_DASHES = ("-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))


def same_as_earlier(series: dict[str, np.ndarray]) -> dict[str, str]:
    """``{name: "= earlier"}`` for every series equal to one listed before it, ``"≈ earlier"``
    when within 0.1% at every step (lines a reader cannot tell apart on the plot)."""
    out: dict[str, str] = {}
    names = list(series)
    for i, name in enumerate(names):
        for other in names[:i]:
            if other in out:
                continue
            if np.array_equal(series[name], series[other]):
                out[name] = f"= {other}"
                break
            if np.allclose(series[name], series[other], rtol=1e-3, atol=0):
                out[name] = f"≈ {other}"
                break
    return out


def plot_simulation(result: "SimulationResult", path: str | Path, title: str | None = None, unit: str = "s") -> Path:
    """Two panels over steps: estimated step time per policy (in ``unit``, the cost model's
    time unit), and imbalance per policy.

    Policies often coincide (several packers reach the same plan), so no line may hide
    another: every policy has its own colour, dash pattern and marker, markers of coinciding
    lines sit on different steps, and the legend names the coincidence ("bfd = multipack").
    The legend stands right of the panels, outside the data; dotted verticals mark the
    steps that end an epoch (short steps: the epoch's remaining sequences).
    """
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), dpi=110, sharex=True)
    same = same_as_earlier({n: t.step_seconds for n, t in result.traces.items()})
    colors = plt.get_cmap("tab10").colors
    n = len(result.traces)
    for i, (name, trace) in enumerate(result.traces.items()):
        steps = np.arange(trace.step_seconds.size)
        bold = name == "balancer"
        style = {
            "color": "black" if bold else colors[i % len(colors)],
            "linestyle": "-" if bold else _DASHES[i % len(_DASHES)],
            "linewidth": 2.4 if bold else 1.2,
            "marker": _MARKERS[i % len(_MARKERS)],
            "markersize": 5 if bold else 4,
            "markevery": (i % max(n, 1), max(n // 2, 1)) if steps.size > n else None,
            "zorder": 3 if bold else 2,
        }
        label = name if name not in same else f"{name} {same[name]}"
        top.plot(steps, trace.step_seconds, label=label, **style)
        bottom.plot(steps, trace.imbalance, label=label, **style)
    for k, step in enumerate(getattr(result, "epoch_ends", ())):
        for ax in (top, bottom):
            ax.axvline(step, color="0.5", linestyle=":", linewidth=1, zorder=1,
                       label="epoch ends (short step)" if (k == 0 and ax is top) else None)
    top.set_ylabel(f"estimated step time ({unit})")
    top.set_title(title or f"Balancer vs baselines on {result.num_ranks} ranks (lower is better)")
    top.grid(True, alpha=0.3)
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)
    bottom.set_ylabel("imbalance (slowest / mean replica)")
    bottom.set_xlabel("step")
    from matplotlib.ticker import MaxNLocator

    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
