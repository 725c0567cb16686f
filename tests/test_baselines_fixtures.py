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

from balancer.baselines.hybrid_cp import balanced_cp_rounds
from balancer.baselines.rules import dp_balanced_groups, length_grouped_order, rows_per_rank
from packers.binpack import best_fit_decreasing, first_fit_decreasing
from packers.partition import karmarkar_karp

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
