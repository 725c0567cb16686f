"""balancer.profile: histogram totals, quantiles, JSON round-trip, sampling."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.data import read_lengths
from balancer.profile import LengthProfile


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 200_000), min_size=1, max_size=300))
def test_histogram_conserves_counts_and_tokens(lengths):
    arr = np.array(lengths)
    prof = LengthProfile.from_lengths(arr)
    assert prof.counts.sum() == len(arr)
    assert prof.tokens.sum() == arr.sum()
    assert np.isclose(prof.square_tokens.sum(), (arr.astype(float) ** 2).sum())
    # every length falls inside its bucket
    b = np.searchsorted(prof.edges, arr, side="right") - 1
    assert np.all(prof.edges[b] <= arr) and np.all(arr < prof.edges[b + 1])
    again = LengthProfile.from_dict(prof.to_dict())
    assert np.array_equal(again.counts, prof.counts) and again.quantiles == prof.quantiles


def test_real_file_quantiles_and_sampling():
    lengths = read_lengths("code_kafka")
    prof = LengthProfile.from_lengths(lengths, source="code_kafka")
    assert prof.quantiles["p50"] == int(np.quantile(lengths, 0.5, method="inverted_cdf"))
    assert prof.max_length == lengths.max()
    draw = prof.sample(50_000, seed=1)
    assert draw.min() >= prof.min_length and draw.max() <= prof.max_length
    # a sample from the histogram reproduces the distribution's median within a bucket width (~9%)
    assert abs(np.median(draw) / np.median(lengths) - 1) < 0.1
    # attention-heavy: the top 1% of sequences take a far larger share of quadratic time than of count
    share = prof.time_share(a=1.0, b=0.0)
    top = prof.edges[1:] > prof.quantiles["p99"]
    assert share[top].sum() > 0.3
    # a per-sequence cost spreads time like the sequence count
    assert np.allclose(prof.time_share(a=0.0, b=0.0, d=1.0), prof.counts / prof.counts.sum())


def test_bad_lengths_name_the_index():
    with pytest.raises(ValueError, match="index 2 is 0"):
        LengthProfile.from_lengths(np.array([5, 3, 0]))
    with pytest.raises(ValueError, match="non-empty"):
        LengthProfile.from_lengths(np.array([], dtype=np.int64))
    with pytest.raises(ValueError, match="index 1 is nan"):
        LengthProfile.from_lengths(np.array([5.0, np.nan]))
    with pytest.raises(ValueError, match=r"index 1 is 1e\+30, out of range"):  # was "-9223372036854775808 tokens"
        LengthProfile.from_lengths(np.array([5.0, 1e30]))


def test_load_accepts_the_folder_hydraulis_profile_writes(tmp_path) -> None:
    prof = LengthProfile.from_lengths(np.array([3, 5, 900]), source="x")
    prof.save(tmp_path / "profile.json")
    assert LengthProfile.load(tmp_path).num_sequences == 3
    with pytest.raises(ValueError, match="is a folder without a profile.json"):
        LengthProfile.load(tmp_path / "..")
    (tmp_path / "data.bin").write_bytes(bytes([0xDE, 0xAD, 0xBE, 0xEF]))
    with pytest.raises(ValueError, match="binary file .* profile it first with `hydraulis profile"):
        LengthProfile.load(tmp_path / "data.bin")
