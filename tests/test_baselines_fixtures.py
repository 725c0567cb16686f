"""The baselines reproduce the real peer systems: replay of ``tests/fixtures/baselines/*.json``.

The fixtures were recorded by running the peers themselves (``generate.py`` there; CI
never installs them). Each test feeds the same inputs to our code and asserts the same
bins, loads and, where the peer defines ties, the same assignment.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from balancer.baselines import make_baseline
from balancer.baselines.hybrid_cp import balanced_cp_rounds
from balancer.baselines.rules import dp_balanced_groups, length_grouped_order, rows_per_rank
from balancer.cost import CostModel, LayoutCost
from packers.binpack import best_fit_decreasing, first_fit_decreasing
from packers.partition import karmarkar_karp
from strategies import ClusterSpec, Layout, Strategy

FIXTURES = Path(__file__).parent / "fixtures" / "baselines"
LENGTHS = Path(__file__).parents[1] / "balancer" / "data" / "lengths"


@cache
def _fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@cache
def _raw(file: str) -> np.ndarray:
    return pq.read_table(LENGTHS / f"{file}.parquet").column("length").to_numpy().astype(np.int64)


def _lengths(case: dict[str, Any]) -> np.ndarray:
    start, stop = case["rows"]
    s = _raw(case["lengths_file"])[start:stop]
    cap = case.get("cap_lengths_at")
    return np.minimum(s, cap) if cap is not None else s


def _cases(name: str) -> list[Any]:
    return [pytest.param(c, id=f"{c['lengths_file'][:4]}-{i}") for i, c in enumerate(_fixture(name)["cases"])]


def _as_lengths(bins: list[Any], s: np.ndarray) -> list[list[int]]:
    return [sorted(s[np.asarray(b, dtype=np.int64)].tolist()) for b in bins]


def test_fixtures_name_their_peer_and_version() -> None:
    names = sorted(p.stem for p in FIXTURES.glob("*.json"))
    assert len(names) == 10
    for name in names:
        fx = _fixture(name)
        assert fx["fixture"] == name and fx["version"] and fx["function"] and fx["cases"]


# -- packing kernels ---------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("trl_bfd"))
def test_bfd_reproduces_trl_assignment(case: dict[str, Any]) -> None:
    """Same rows, same sequences in each (TRL's sort is stable and its ties FIFO, as ours)."""
    s = _lengths(case)
    got = best_fit_decreasing(s, case["capacity"]).bins()
    assert [sorted(b.tolist()) for b in got] == [sorted(b) for b in case["bins"]]
    assert [int(s[b].sum()) for b in got] == case["loads"]


@pytest.mark.parametrize("case", _cases("olmo_core_obfd"))
def test_bfd_reproduces_olmo_core_instances(case: dict[str, Any]) -> None:
    """OLMo-core's sort is unstable, so equal-length documents may trade places: compare lengths."""
    s = _lengths(case)
    got = best_fit_decreasing(s, case["capacity"]).bins()
    assert _as_lengths(got, s) == _as_lengths(case["bins"], s)
    assert [int(s[b].sum()) for b in got] == case["loads"]


@pytest.mark.parametrize("case", _cases("verl_karmarkar_karp"))
def test_karmarkar_karp_matches_verl_sums(case: dict[str, Any]) -> None:
    s = _lengths(case)
    got = karmarkar_karp(s, case["k_partitions"], equal_counts=case["equal_size"])
    sums = np.bincount(got.bin_of, weights=s, minlength=case["k_partitions"]).astype(np.int64)
    assert sorted(sums.tolist(), reverse=True) == sorted(case["sums"], reverse=True)
    if case["equal_size"]:
        assert set(np.bincount(got.bin_of).tolist()) == {s.size // case["k_partitions"]}


# -- one row per rank per micro-step (TRL, multipack) -------------------------------------


@pytest.mark.parametrize("case", _cases("trl_bfd"))
def test_rows_per_rank_keep_trl_rows_when_they_divide(case: dict[str, Any]) -> None:
    """A batch TRL packs into a multiple of R rows keeps exactly TRL's rows; any other is
    packed into at most k·R rows of at most the capacity (k = TRL's rows / R, rounded up)."""
    s = _lengths(case)
    r = case["num_replicas"]
    rows = rows_per_rank(best_fit_decreasing, s, case["capacity"], r)
    if len(case["bins"]) % r == 0:
        assert [sorted(b.tolist()) for b in rows] == [sorted(b) for b in case["bins"]]
    else:
        assert len(rows) <= -(-len(case["bins"]) // r) * r
        assert max(int(s[b].sum()) for b in rows) <= case["capacity"]
    assert sorted(np.concatenate(rows).tolist()) == list(range(s.size))


@pytest.mark.parametrize("name", ["openchat_multipack_v1", "openchat_multipack_v2_linear"])
def test_rows_per_rank_reproduce_multipack_steps(name: str) -> None:
    """Given the step the multipack sampler chose, rank r gets the sampler's bin r."""
    for case in _fixture(name)["cases"]:
        s = _lengths(case)
        for step in case["steps"]:
            start, stop = step["rows"]
            batch = s[start:stop]
            rows = rows_per_rank(first_fit_decreasing, batch, case["capacity"], case["num_replicas"])
            assert _as_lengths(rows, batch) == _as_lengths(step["bins"], s)


# -- Megatron ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("megatron_lm_dp_balanced"))
def test_dp_balanced_reproduces_megatron(case: dict[str, Any]) -> None:
    s = _lengths(case)
    r = case["num_replicas"]
    if "raises" in case:
        with pytest.raises(ValueError, match="Not enough samples to move"):
            dp_balanced_groups(s, case["capacity"], r)
        return
    groups = dp_balanced_groups(s, case["capacity"], r)
    assert [[groups[k * r + d] for d in range(r)] for k in range(len(groups) // r)] == case["micro_batches"]


@pytest.mark.parametrize("case", _cases("megatron_core_hybrid_cp"))
def test_hybrid_cp_rounds_reproduce_megatron(case: dict[str, Any]) -> None:
    s = _lengths(case)
    rounds = balanced_cp_rounds(s, case["max_seq_len_per_rank"], case["num_gpus"])
    assert [rnd.per_gpu(case["num_gpus"]) for rnd in rounds] == case["rounds"]
    for rnd in rounds:
        assert [g for grp in rnd.groups for g in grp] == list(range(case["num_gpus"]))


# -- transformers group_by_length -------------------------------------------------------


@pytest.mark.parametrize("case", _cases("transformers_length_grouped"))
def test_length_grouped_order_reproduces_transformers(case: dict[str, Any]) -> None:
    s = _lengths(case)
    batch = case["per_device_train_batch_size"] * case["gradient_accumulation_steps"]
    assert length_grouped_order(s, batch, np.array(case["randperm"])).tolist() == case["order"]


# -- the policies themselves, on the peers' global batches ---------------------------------

def _one_layout(capacity: int, num_ranks: int) -> tuple[ClusterSpec, Strategy, CostModel]:
    """``num_ranks`` single-GPU replicas of ``capacity`` tokens (Megatron's dp ranks, TRL's ranks)."""
    model = CostModel.from_coefficients({Layout(1): LayoutCost(a=1e-9, b=1e-5, c=1e-3, token_capacity=capacity)})
    cluster = ClusterSpec(num_ranks=num_ranks, ranks_per_node=min(num_ranks, 8))
    return cluster, Strategy.homogeneous(Layout(1), num_ranks), model


def _replica_batches(plan) -> list[list[list[int]]]:
    return [[list(mb) for mb in rep.micro_batches if mb] for rep in plan.replicas]


@pytest.mark.parametrize("case", _cases("megatron_lm_dp_balanced"))
def test_megatron_dp_balanced_policy_reproduces_megatron(case: dict[str, Any]) -> None:
    s = _lengths(case)
    r = case["num_replicas"]
    policy = make_baseline("megatron_dp_balanced", *_one_layout(case["capacity"], r))
    if "raises" in case:
        with pytest.raises(ValueError, match="Not enough samples to move"):
            policy.plan(s)
        return
    got = _replica_batches(policy.plan(s))
    want = [[step[d] for step in case["micro_batches"]] for d in range(r)]
    assert got == want


@pytest.mark.parametrize("name", ["openchat_multipack_v1", "openchat_multipack_v2_linear"])
def test_multipack_policy_gives_rank_r_the_samplers_bin_r(name: str) -> None:
    for case in _fixture(name)["cases"]:
        s = _lengths(case)
        policy = make_baseline("multipack", *_one_layout(case["capacity"], case["num_replicas"]))
        for step in case["steps"]:
            start, stop = step["rows"]
            plan = policy.plan(s[start:stop], sample_ids=np.arange(start, stop))
            got = [sorted(s[[i for mb in rep.micro_batches for i in mb]].tolist()) for rep in plan.replicas]
            assert got == _as_lengths(step["bins"], s)


@pytest.mark.parametrize("case", _cases("trl_bfd"))
def test_bfd_policy_runs_trl_rows_one_per_rank_per_micro_step(case: dict[str, Any]) -> None:
    s = _lengths(case)
    r = case["num_replicas"]
    plan = make_baseline("bfd", *_one_layout(case["capacity"], r)).plan(s)
    counts = {len(rep.micro_batches) for rep in plan.replicas}
    assert len(counts) == 1  # every rank the same number of rows
    rows = sorted(sorted(mb) for rep in plan.replicas for mb in rep.micro_batches if mb)
    if len(case["bins"]) % r == 0:
        assert rows == sorted(sorted(b) for b in case["bins"])


@pytest.mark.parametrize("case", _cases("transformers_length_grouped"))
def test_length_grouped_policy_reproduces_transformers_steps(case: dict[str, Any]) -> None:
    s = _lengths(case)
    per_device, accum = case["per_device_train_batch_size"], case["gradient_accumulation_steps"]
    for r_text, first in case["first_micro_batches"].items():
        r = int(r_text)
        cluster, strategy, model = _one_layout(1 << 20, r)
        policy = make_baseline(
            "length_grouped", cluster, strategy, model, max_length=int(s.max()), micro_batch_size=per_device,
            gradient_accumulation_steps=accum,
        )
        order = policy.epoch_order(s, np.array(case["randperm"]), tokens_per_step=1)
        assert order.tolist() == case["order"]
        step = order[: r * per_device * accum]  # transformers' first optimizer step
        plan = policy.plan(s[step], sample_ids=step)
        assert _replica_batches(plan) == [mbs[:accum] for mbs in first]


@pytest.mark.parametrize("case", _cases("megatron_core_hybrid_cp"))
def test_hybrid_cp_policy_runs_megatrons_groups(case: dict[str, Any]) -> None:
    s = _lengths(case)
    msl, gpus = case["max_seq_len_per_rank"], case["num_gpus"]
    table = {Layout(1, g): LayoutCost(a=1e-9, b=1e-5, c=1e-3, token_capacity=g * msl) for g in (1, 2, 4, 8, 16, 32, 64) if g <= gpus}
    model = CostModel.from_coefficients(table)
    cluster = ClusterSpec(num_ranks=gpus, ranks_per_node=min(gpus, 8))
    static = Strategy.homogeneous(Layout(1, min(gpus, 8)), gpus)
    policy = make_baseline("megatron_hybrid_cp", cluster, static, model, max_length=case["cap_lengths_at"])
    plan = policy.plan(s)
    first = case["rounds"][0]
    want: dict[tuple[int, ...], list[int]] = {}
    for gpu, ids in enumerate(first):  # a group's GPUs list the same sequences
        key = tuple(ids)
        want[key] = [*want.get(key, []), gpu]
    got = {tuple(rep.ranks): sorted(rep.sample_ids) for rep in plan.replicas}
    assert sorted(got) == sorted(tuple(g) for g in want.values())
    if len(case["rounds"]) == 1:
        assert sorted(got.items()) == sorted((tuple(g), sorted(ids)) for ids, g in want.items())
