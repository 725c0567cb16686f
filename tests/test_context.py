"""strategies.context: head+tail cp chunks partition every sequence and balance work."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.context import chunk_bounds, cp_local_seqlens, cp_token_index


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=6), st.sampled_from([1, 2, 3, 4]))
def test_cp_shards_partition_the_row(seq_lens, cp):
    seq_lens = np.array(seq_lens)
    parts = [cp_token_index(seq_lens, cp, r) for r in range(cp)]
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(int(seq_lens.sum())))
    for r in range(cp):
        assert cp_local_seqlens(seq_lens, cp, r).sum() == len(parts[r])
        assert np.all(np.diff(parts[r]) > 0)  # kept in row order


def test_head_tail_balances_causal_work():
    s, cp = 1024, 4
    b = chunk_bounds(s, cp)
    work = []
    for r in range(cp):
        idx = cp_token_index(np.array([s]), cp, r)
        work.append(int((idx + 1).sum()))  # causal work of a query at position p is p+1 keys
    assert max(work) / min(work) < 1.01
    assert b[0] == 0 and b[-1] == s and len(b) == 2 * cp + 1
