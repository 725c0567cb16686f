"""hydraulis.plots: the per-doubling shares behind the time-share plot, and the PNGs."""

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.profile import LengthProfile
from hydraulis.plots import (
    _DASHES,
    doubling_shares,
    plot_length_histogram,
    plot_simulation,
    plot_time_share,
    same_as_earlier,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 200_000), min_size=1, max_size=300), st.floats(0, 1e-6), st.floats(0, 1e-3),
       st.sampled_from([0.0, 1e-3]))
def test_shares_match_a_direct_count_per_power_of_two(lengths: list[int], a: float, b: float, d: float) -> None:
    s = np.asarray(lengths, dtype=np.int64)
    shares = doubling_shares(LengthProfile.from_lengths(s), a, b, d)
    group = np.floor(np.log2(s)).astype(np.int64)
    keys = np.unique(group)
    assert shares.lo.size == keys.size
    for j, k in enumerate(keys):
        m = group == k
        assert shares.lo[j] == max(1 << int(k), int(s.min())) and shares.hi[j] == min((2 << int(k)) - 1, int(s.max()))
        assert shares.sequences[j] == pytest.approx(m.sum() / s.size)
        assert shares.tokens[j] == pytest.approx(s[m].sum() / s.sum())
        t = a * s.astype(float) ** 2 + b * s + d
        if t.sum() > 0:
            assert shares.time[j] == pytest.approx(t[m].sum() / t.sum(), rel=1e-9, abs=1e-12)


def test_merge_leading_keeps_the_totals() -> None:
    lengths = np.concatenate([[1, 2, 5, 9], np.full(1000, 300), np.full(50, 5000)])
    shares = doubling_shares(LengthProfile.from_lengths(lengths), 1e-9, 1e-6)
    merged = shares.merge_leading()
    assert merged.lo.size < shares.lo.size
    assert (merged.lo[0], merged.hi[0], merged.lo[1]) == (1, 15, 256)  # 1, 2, 5, 9 folded; no empty groups
    for name in ("sequences", "tokens", "time"):
        assert getattr(merged, name).sum() == pytest.approx(1.0)
    assert merged.above(4096) == pytest.approx(shares.above(4096))


def _captured(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every figure the plots save (the PNG is still written)."""
    import matplotlib.figure

    figures: list[Any] = []
    original = matplotlib.figure.Figure.savefig

    def capture(self: Any, *args: Any, **kwargs: Any) -> Any:
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    return figures


def _png(path: Path, figure: Any) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)
    width, height = figure.get_size_inches() * figure.dpi
    assert pixels.shape[:2] == (round(height), round(width))
    assert pixels[..., :3].std() > 0.05, "a blank picture"
    return pixels


def test_plots_write_png_files_with_their_axes_and_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = _captured(monkeypatch)
    prof = LengthProfile.from_lengths(np.random.default_rng(0).lognormal(6, 1.2, 2000).astype(np.int64) + 1)
    plot_length_histogram(prof, tmp_path / "h.png")
    shares = doubling_shares(prof, 1e-9, 1e-6)
    plot_time_share(shares, tmp_path / "t.png", "test cost")
    hist, share = figures

    _png(tmp_path / "h.png", hist)
    (ax,) = hist.axes
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert ax.get_xlabel() == "sequence length (tokens)" and "sequences per bucket" in ax.get_ylabel()
    assert "2,000 sequences" in ax.get_title()
    assert len(ax.patches) == 1  # the histogram's one step patch
    marks = [float(line.get_xdata()[0]) for line in ax.lines]  # p50, p90, p99, max as vertical lines
    q = prof.quantiles
    assert marks == [q["p50"], q["p90"], q["p99"], prof.max_length]
    assert [t.get_text().split()[0] for t in ax.texts] == ["p50", "p90", "p99", "max"]

    _png(tmp_path / "t.png", share)
    (ax,) = share.axes
    merged = shares.merge_leading()
    assert len(ax.containers) == 3  # sequences, tokens, estimated time
    for bars, want in zip(ax.containers, (merged.sequences, merged.tokens, merged.time)):
        assert [b.get_height() for b in bars] == pytest.approx(100 * want)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["sequences", "tokens", "estimated time (test cost)"]
    assert [t.get_text() for t in ax.get_xticklabels()] == merged.labels()
    assert ax.get_ylabel() == "share (%)"


def test_simulation_plot_has_one_line_per_policy_on_both_panels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    figures = _captured(monkeypatch)
    steps = np.arange(6, dtype=np.float64)
    traces = {
        name: types.SimpleNamespace(step_seconds=1.0 + k + 0.1 * steps, imbalance=1.0 + 0.05 * k * np.ones(6))
        for k, name in enumerate(["balancer", "fixed", "multipack"])
    }
    plot_simulation(types.SimpleNamespace(traces=traces, num_ranks=8), tmp_path / "s.png", unit="ms")
    (fig,) = figures
    _png(tmp_path / "s.png", fig)
    top, bottom = fig.axes
    assert top.get_ylabel() == "estimated step time (ms)" and "8 ranks" in top.get_title()
    assert bottom.get_xlabel() == "step"
    for ax, key in ((top, "step_seconds"), (bottom, "imbalance")):
        assert [line.get_label() for line in ax.lines] == list(traces)
        for line, trace in zip(ax.lines, traces.values()):
            assert line.get_ydata().tolist() == getattr(trace, key).tolist()
    assert top.lines[0].get_linewidth() > top.lines[1].get_linewidth()  # the balancer stands out


def test_coinciding_series_are_named_so_no_line_hides_unexplained() -> None:
    a = np.array([1.0, 2.0, 3.0])
    got = same_as_earlier({"multipack": a, "bfd": a.copy(), "wlb": a * (1 + 1e-5), "padded": a * 2, "x": a * 2})
    assert got == {"bfd": "= multipack", "wlb": "≈ multipack", "x": "= padded"}


def test_simulation_plot_with_epoch_ends(tmp_path) -> None:
    from balancer.cost import CostModel
    from balancer.simulation import SimulationConfig, simulate
    from strategies import ClusterSpec

    lengths = np.random.default_rng(1).integers(100, 4000, size=300)
    cost = CostModel.from_coefficients({"tp1": (1e-9, 1e-6, 1e-4, 4096)})
    res = simulate(lengths, ClusterSpec(num_ranks=4), cost, SimulationConfig(
        tokens_per_step=200_000, num_steps=8, max_length=4096, policies=("multipack", "bfd", "padded")))
    assert res.epoch_ends  # ~620K tokens: an epoch every 4 steps
    plot_simulation(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC


def test_every_policy_line_has_its_own_style_and_the_legend_sits_outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's ten policies (balancer, look-ahead, eight baselines), four of them identical:
    every line differs from every other in colour, marker and (but the balancer) dash
    pattern, coinciding lines put their markers on different steps, and the legend's box
    lies right of the data panel."""
    from matplotlib.colors import to_rgba

    figures = _captured(monkeypatch)
    names = ["balancer", "balancer_lookahead", "padded", "length_grouped", "multipack", "bfd",
             "megatron_dp_balanced", "megatron_hybrid_cp", "wlb_llm", "hydraulis_random_restart"]
    same = np.linspace(1.0, 2.0, 20)
    traces = {
        name: types.SimpleNamespace(step_seconds=same if name in ("multipack", "bfd", "megatron_dp_balanced", "wlb_llm")
                                    else same + 1 + k, imbalance=np.ones(20))
        for k, name in enumerate(names)
    }
    plot_simulation(types.SimpleNamespace(traces=traces, num_ranks=16), tmp_path / "s.png")
    (fig,) = figures
    top = fig.axes[0]
    lines = top.lines[: len(names)]
    assert len({to_rgba(line.get_color()) for line in lines}) == len(names)
    assert len({line.get_marker() for line in lines}) == len(names)
    dashes = [str(line.get_linestyle()) + str(getattr(line, "_unscaled_dash_pattern", "")) for line in lines[1:]]
    assert len(set(dashes)) >= min(len(_DASHES), len(names) - 1)
    coinciding = [line for line in lines if line.get_label().split()[0] in ("multipack", "bfd", "megatron_dp_balanced", "wlb_llm")]
    marked = [tuple(np.arange(20)[line.get_markevery()[0]:: line.get_markevery()[1]]) for line in coinciding]
    assert len(set(m[0] for m in marked)) == len(coinciding)  # markers start on different steps
    assert [line.get_label() for line in coinciding][1:] == ["bfd = multipack", "megatron_dp_balanced = multipack", "wlb_llm = multipack"]
    fig.canvas.draw()
    legend = top.get_legend().get_window_extent()
    assert legend.x0 >= top.get_window_extent().x1  # right of the panel: covers no data
