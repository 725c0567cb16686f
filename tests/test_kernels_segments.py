"""strategies.kernels.segments: the attention layout of a packed row, and the kernel tensors built from it."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.context import cp_local_seqlens, cp_token_index
from strategies.kernels import build_segments


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=0, max_size=6), st.integers(1, 4))
def test_cp_segments_are_causal_prefixes_of_the_rows_held(seq_lens, cp):
    seq_lens = np.array(seq_lens, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(seq_lens)])[:-1]
    for r in range(cp):
        seg = build_segments(seq_lens, cp, r)
        own = cp_token_index(seq_lens, cp, r)
        assert seg.num_queries == own.size == cp_local_seqlens(seq_lens, cp, r).sum()
        q = seg.q_bounds
        assert q.size == 0 or (q[0, 0] == 0 and q[-1, 1] == seg.num_queries and np.all(q[1:, 0] == q[:-1, 1]))
        for (q_lo, q_hi), (k_lo, k_hi) in zip(seg.q_bounds.tolist(), seg.k_bounds.tolist()):
            rows = own[q_lo:q_hi]
            # the queries are the last q_hi-q_lo keys: lower-right causal = mask by true position
            np.testing.assert_array_equal(rows, np.arange(k_hi - (q_hi - q_lo), k_hi))
            seq = int(np.searchsorted(starts, rows[0], side="right") - 1)
            assert k_lo == starts[seq] and k_hi <= starts[seq] + seq_lens[seq]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=0, max_size=6), st.integers(1, 4))
def test_kernel_tensors_describe_the_same_segments(seq_lens, cp):
    """cu_seqlens_q/k, max_q/k and the back-to-back key rows agree with the host bounds."""
    for r in range(cp):
        seg = build_segments(np.array(seq_lens, dtype=np.int64), cp, r)
        q_len = seg.q_bounds[:, 1] - seg.q_bounds[:, 0]
        k_len = seg.k_bounds[:, 1] - seg.k_bounds[:, 0]
        np.testing.assert_array_equal(seg.cu_q.numpy(), np.concatenate([[0], np.cumsum(q_len)]))
        np.testing.assert_array_equal(seg.cu_k.numpy(), np.concatenate([[0], np.cumsum(k_len)]))
        assert seg.cu_q.dtype == seg.cu_k.dtype and str(seg.cu_q.dtype) == "torch.int32"
        assert seg.max_q == (int(q_len.max()) if len(q_len) else 0)
        assert seg.max_k == (int(k_len.max()) if len(k_len) else 0)
        assert seg.pairs == tuple(tuple(a) + tuple(b) for a, b in zip(seg.q_bounds.tolist(), seg.k_bounds.tolist()))
        if cp == 1:
            assert seg.square and seg.k_rows is None and seg.num_keys == seg.num_queries
        else:
            want = [np.arange(lo, hi) for lo, hi in seg.k_bounds.tolist()]
            np.testing.assert_array_equal(seg.k_rows.numpy(), np.concatenate(want) if want else [])
            assert seg.num_keys == sum(seq_lens)
