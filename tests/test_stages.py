"""strategies.stages: the cost-balanced stage split (against brute force), the stage costs,
and the exact 1F1B replay on small cases worked by hand."""

import itertools
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.stages import (
    block_flops_per_token,
    lm_head_blocks,
    simulate_1f1b,
    split_stages,
    stage_costs,
    stage_imbalance,
)

# extras that tie with whole blocks (0, 0.5, 1, ...) as well as arbitrary ones
extras = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 2.0 ** -52]), st.floats(0.0, 6.0, allow_nan=False))


def _brute_force(num_layers: int, pp: int, first: float, last: float) -> list[int]:
    """Stage sizes of the documented optimum, by trying every contiguous split: the sorted
    stage costs lexicographically smallest (so the smallest maximum first), then the most
    blocks up front."""
    best = None
    for cuts in itertools.combinations(range(1, num_layers), pp - 1):
        bounds = [0, *cuts, num_layers]
        sizes = [bounds[p + 1] - bounds[p] for p in range(pp)]
        costs = [Fraction(n) for n in sizes]  # exact, as split_stages compares
        costs[0] += Fraction(first)
        costs[-1] += Fraction(last)
        key = (sorted(costs, reverse=True), [-n for n in sizes])
        if best is None or key < best[0]:
            best = (key, sizes)
    assert best is not None
    return best[1]


@settings(max_examples=300, deadline=None)
@given(num_layers=st.integers(1, 12), data=st.data(), first=extras, last=extras)
def test_split_is_the_brute_force_optimum(num_layers: int, data, first: float, last: float) -> None:
    pp = data.draw(st.integers(1, num_layers))
    stages = split_stages(num_layers, pp, first_extra=first, last_extra=last)
    assert [len(r) for r in stages] == _brute_force(num_layers, pp, first, last)


@settings(max_examples=200, deadline=None)
@given(num_layers=st.integers(1, 200), data=st.data(), first=extras, last=st.floats(0.0, 50.0))
def test_split_invariants(num_layers: int, data, first: float, last: float) -> None:
    pp = data.draw(st.integers(1, min(num_layers, 64)))
    stages = split_stages(num_layers, pp, first_extra=first, last_extra=last)
    assert len(stages) == pp
    assert [i for r in stages for i in r] == list(range(num_layers))  # contiguous, every block once
    assert all(r.step == 1 and len(r) >= 1 for r in stages)
    costs = stage_costs(stages, first_extra=first, last_extra=last)
    assert sum(costs) == pytest.approx(num_layers + first + last)
    # no single block moved to a neighbour lowers the slowest stage (a local check of the optimum)
    for p in range(pp - 1):
        for move in (-1, 1):
            sizes = [len(r) for r in stages]
            sizes[p] += move
            sizes[p + 1] -= move
            if min(sizes) >= 1:
                moved = stage_costs([range(n) for n in sizes], first_extra=first, last_extra=last)
                assert max(moved) >= max(costs) - 1e-12
    assert stage_imbalance(stages, first_extra=first, last_extra=last) >= 1 - 1e-12


@given(num_layers=st.integers(1, 64), data=st.data())
def test_without_extras_it_is_the_count_split_larger_stages_first(num_layers: int, data) -> None:
    pp = data.draw(st.integers(1, num_layers))
    base, extra = divmod(num_layers, pp)
    assert [len(r) for r in split_stages(num_layers, pp)] == [base + (p < extra) for p in range(pp)]


def test_more_stages_than_blocks_and_bad_extras_are_refused() -> None:
    with pytest.raises(ValueError, match=r"pp=5 exceeds num_layers=4.*max_pp"):
        split_stages(4, 5)
    with pytest.raises(ValueError, match="pp=0 must be a positive integer"):
        split_stages(4, 0)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="last_extra=.* must be a finite cost >= 0"):
            split_stages(4, 2, last_extra=bad)


def test_the_head_moves_blocks_forward_only_when_it_outweighs_them() -> None:
    assert [len(r) for r in split_stages(8, 2, last_extra=0.9)] == [4, 4]  # 4 | 4.9 beats 5 | 3.9
    assert [len(r) for r in split_stages(8, 2, last_extra=2.5)] == [5, 3]  # 5 | 5.5 beats 4 | 6.5
    assert [len(r) for r in split_stages(8, 4, last_extra=2.0)] == [3, 2, 2, 1]  # costs 3 2 2 3
    # costs 4 4 3 or 4 3 4 (3 | 3 | 3 blocks): the same sorted costs, the blocks go up front
    assert [len(r) for r in split_stages(9, 3, first_extra=1.0, last_extra=1.0)] == [3, 4, 2]


def test_llama_7b_block_and_head_flops_by_hand() -> None:
    h, f, v, s = 4096, 11008, 32000, 2048
    block = 2 * h * 4 * h + 6 * h * f + 2 * h * s  # q, k, v, o (no GQA) + SwiGLU + causal attention
    shape = dict(hidden_size=h, ffn_hidden_size=f, num_heads=32, num_kv_heads=32)
    assert block_flops_per_token(**shape) == block == pytest.approx(4.215e8, rel=1e-3)
    assert block_flops_per_token(**shape, tp=4) == block / 4
    assert lm_head_blocks(**shape, vocab_size=v) == pytest.approx((2 * h * v + 5 * v) / block)
    assert lm_head_blocks(**shape, vocab_size=v) == pytest.approx(0.622, abs=1e-3)
    # the head is split by vocabulary like the blocks: the same share at any tp dividing V
    assert lm_head_blocks(**shape, vocab_size=v, tp=4) == pytest.approx(lm_head_blocks(**shape, vocab_size=v))
    # an uneven vocabulary: the busiest rank's ceil(V/tp) rows
    assert lm_head_blocks(**shape, vocab_size=v + 1, tp=4) == pytest.approx((2 * h + 5) * 8001 / (block / 4))
    # grouped-query attention shrinks k and v: Llama-70B-like 8 KV heads of 64
    gqa = block_flops_per_token(hidden_size=8192, ffn_hidden_size=28672, num_heads=64, num_kv_heads=8, seq_len=0)
    assert gqa == 2 * 8192 * (2 * 8192 + 2 * 1024) + 6 * 8192 * 28672


LLAMA = {"llama-7b": (32, dict(hidden_size=4096, ffn_hidden_size=11008, num_heads=32, num_kv_heads=32)),
         "llama-13b": (40, dict(hidden_size=5120, ffn_hidden_size=13824, num_heads=40, num_kv_heads=40))}
RESIDUAL = {  # (model, pp): cost split sizes, max/mean of the count split, of the cost split, analytic/busiest
    ("llama-7b", 2): ([16, 16], 1.019, 1.019, 1.000),
    ("llama-7b", 4): ([8] * 4, 1.057, 1.057, 1.000),
    ("llama-7b", 8): ([4] * 8, 1.134, 1.134, 1.000),
    ("llama-13b", 2): ([20, 20], 1.012, 1.012, 1.000),
    ("llama-13b", 4): ([10] * 4, 1.037, 1.037, 1.000),
    ("llama-13b", 8): ([5] * 8, 1.086, 1.086, 1.000),
}


@pytest.mark.parametrize("tp", [1, 4, 8])
@pytest.mark.parametrize("key", list(RESIDUAL))
def test_llama_residual_imbalance_old_and_new_split(key, tp: int) -> None:
    """The table in docs/runtime.md: the slowest stage over the mean, count split vs cost split,
    and the analytic model's stage (``ceil(L/pp)`` blocks + the head divided by tp, both per
    rank) over the runtime's busiest stage (the head split by vocabulary over tp too): the same
    at every tp that divides the vocabulary."""
    name, pp = key
    sizes, count_ratio, cost_ratio, analytic_ratio = RESIDUAL[key]
    layers, shape = LLAMA[name]
    head = lm_head_blocks(**shape, vocab_size=32000, tp=tp)
    stages = split_stages(layers, pp, last_extra=head)
    assert [len(r) for r in stages] == sizes
    assert stage_imbalance(split_stages(layers, pp), last_extra=head) == pytest.approx(count_ratio, abs=5e-4)
    assert stage_imbalance(stages, last_extra=head) == pytest.approx(cost_ratio, abs=5e-4)
    analytic = -(-layers // pp) + lm_head_blocks(**shape, vocab_size=32000)  # head / tp over block / tp
    assert analytic / max(stage_costs(stages, last_extra=head)) == pytest.approx(analytic_ratio, abs=5e-4)


# -- the replay -----------------------------------------------------------------------------------
def test_replay_of_two_stages_by_hand() -> None:
    # pp2, v2, forward 1 s, backward 2 s. Stage 0 runs F0 F1 B0 B1, stage 1 F0 B0 F1 B1:
    # stage 1: F0 1–2, B0 2–4, F1 4–5, B1 5–7; stage 0: F0 0–1, F1 1–2, B0 4–6, B1 7–9.
    fwd, bwd = np.ones((2, 2)), np.full((2, 2), 2.0)
    assert simulate_1f1b(fwd, bwd) == pytest.approx(9.0)
    assert simulate_1f1b(fwd, bwd) == pytest.approx((2 + 2 - 1) * 3.0)  # (v + pp − 1)·(f + b)
