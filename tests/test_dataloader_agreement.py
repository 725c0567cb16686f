"""dataloader.agreement: the batch fingerprint, the outcome encoding, a plan checked against this rank's batch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.cost import CostModel
from balancer.selector import Balancer
from dataloader.agreement import KINDS, PlanBatch, batch_fingerprint, decode_outcome, encode_outcome, rank_plan_for
from strategies.layout import ClusterSpec, Layout, Strategy


def batch(ids: list[int], lengths: list[int], step: int = 0, content: bytes = b"") -> PlanBatch:
    lens = np.asarray(lengths, dtype=np.int64)
    return PlanBatch(step=step, lengths=lens, ids=np.asarray(ids, dtype=np.int64), loss_tokens=lens - 1, content=content)


@settings(max_examples=50, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    step=st.integers(0, 2**62),
    fingerprint=st.one_of(st.just(""), st.binary(min_size=16, max_size=16).map(bytes.hex)),
    digest=st.one_of(st.just(""), st.binary(min_size=32, max_size=32).map(bytes.hex)),
)
def test_outcomes_round_trip_through_one_int64_tensor(kind: str, step: int, fingerprint: str, digest: str) -> None:
    arr = encode_outcome(kind, step, fingerprint, digest)
    assert arr.dtype == np.int64 and arr.shape == (8,)
    got = decode_outcome(arr)
    assert got[:2] == (kind, step)
    assert got[2] == ("" if set(fingerprint) <= {"0"} else fingerprint)  # all-zero bytes read as "none"
    assert got[3] == ("" if set(digest) <= {"0"} else digest)


def test_the_fingerprint_sees_every_part_of_the_batch() -> None:
    base = batch([4, 1, 7], [10, 20, 30])
    same = batch([4, 1, 7], [10, 20, 30])
    assert batch_fingerprint(base) == batch_fingerprint(same)
    others = [
        batch([1, 4, 7], [10, 20, 30]),  # another order (another seed)
        batch([4, 1, 8], [10, 20, 30]),  # another sample
        batch([4, 1, 7], [10, 21, 30]),  # another tokenisation
        batch([4, 1, 7], [10, 20, 30], content=b"\x01"),  # other tokens (streams)
        PlanBatch(step=0, lengths=base.lengths, ids=base.ids, loss_tokens=base.loss_tokens - 1),  # other labels
    ]
    assert len({batch_fingerprint(b) for b in [base, *others]}) == 1 + len(others)


def test_a_plan_of_another_batch_is_refused_before_building() -> None:
    cost = CostModel.from_coefficients({"tp1": (1e-6, 1e-4, 1e-3, 256)})
    bal = Balancer(ClusterSpec(num_ranks=2), [Strategy.homogeneous(Layout(tp=1), 2)], cost)
    mine = batch([4, 1, 7], [10, 20, 30], step=3)
    plan = bal.plan(mine.lengths, sample_ids=mine.ids, loss_tokens=mine.loss_tokens, step=3)
    assert rank_plan_for(mine, plan, 1, 2).rank == 1
    with pytest.raises(ValueError, match=r"holds 3 sequences / 57 loss tokens but this rank's batch has 2 / 28"):
        rank_plan_for(batch([4, 1], [10, 20], step=3), plan, 0, 2)
    with pytest.raises(ValueError, match=r"planned but not in the batch: \[7\]; in the batch but not planned: \[9\]"):
        rank_plan_for(batch([4, 1, 9], [10, 20, 30], step=3), plan, 0, 2)
    with pytest.raises(ValueError, match="covers 2 ranks but the sampler runs on 3"):
        rank_plan_for(mine, plan, 0, 3)
