"""hydraulis.plots: the per-doubling shares behind the time-share plot, and the PNGs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.profile import LengthProfile
from hydraulis.plots import doubling_shares, plot_length_histogram, plot_time_share

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


def test_plots_write_png_files(tmp_path) -> None:
    prof = LengthProfile.from_lengths(np.random.default_rng(0).lognormal(6, 1.2, 2000).astype(np.int64) + 1)
    plot_length_histogram(prof, tmp_path / "h.png")
    plot_time_share(doubling_shares(prof, 1e-9, 1e-6), tmp_path / "t.png", "test cost")
    for name in ("h.png", "t.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
