"""dataloader.lookahead through BalancedDataLoader: regrouped windows, exactly once, the band, resume."""

from __future__ import annotations

import copy
from typing import Any

import datasets
import numpy as np
import pytest
import torch.distributed as dist
import torch.utils.data as tud
from test_dataloader_dist import run_ranks

from balancer.cost import CostModel
from balancer.selector import Balancer, BalancerConfig
from dataloader import BalancedDataLoader, StepBatch
from strategies.layout import ClusterSpec, Layout, Strategy

CAP = 64
BUDGET = 700
K = 3


def make_balancer(world: int, k: int = K, *, hetero: bool = True, eps: float = 0.1) -> Balancer:
    """tp1 holds CAP tokens, tp2 2·CAP: long rows need a tp2 replica, so how many share a
    step matters (look-ahead regroups them)."""
    cost = CostModel.from_coefficients({"tp1": (1e-6, 1e-4, 1e-3, CAP), "tp2": (0.6e-6, 0.6e-4, 1e-3, 2 * CAP)})
    cands = [Strategy.homogeneous(Layout(tp=2), world)]
    if hetero:
        cands.append(Strategy.homogeneous(Layout(tp=1), world))
        cands += [Strategy.from_counts([(Layout(tp=2), j), (Layout(tp=1), world - 2 * j)]) for j in range(1, world // 2)]
    return Balancer(ClusterSpec(num_ranks=world), cands, cost, BalancerConfig(lookahead_steps=k, lookahead_epsilon=eps))


def dataset(n: int = 160, seed: int = 0) -> datasets.Dataset:
    """Mostly short rows, one in six long (above tp1's capacity)."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(n) < 1 / 6, rng.integers(CAP + 1, 2 * CAP, size=n), rng.integers(1, 40, size=n))
    return datasets.Dataset.from_dict({"input_ids": [rng.integers(1, 500, size=int(s)).tolist() for s in lengths]})


def ids_of(batch: StepBatch) -> list[int]:
    """This rank's sample ids of the step."""
    return [s for spec in batch.specs for s in spec.sample_ids]


def every(batch: StepBatch) -> list[int]:
    """The step's sample ids on every replica (from the plan)."""
    return sorted(batch.plan.sample_ids())


def run_world(ds: datasets.Dataset, world: int, **kw: Any) -> list[tuple[int, int, list[int]]]:
    """``(step, tokens, sample ids of every replica)`` per step, all ranks iterated together."""
    bal_k = kw.pop("k", K)
    loaders = [
        BalancedDataLoader(ds, balancer=make_balancer(world, bal_k), rank=r, world_size=world, plan_sync="none", **kw) for r in range(world)
    ]
    out = []
    for steps in zip(*loaders):
        assert len({b.plan.digest for b in steps}) == 1
        replicas: dict[int, list[int]] = {}
        for b in steps:
            replicas.setdefault(b.rank_plan.replica_index, ids_of(b))
        out.append((steps[0].step, steps[0].plan.global_tokens, sorted(s for ids in replicas.values() for s in ids)))
    return out


def sampled_steps(ds: datasets.Dataset, world: int, **kw: Any) -> list[list[int]]:
    """The same run without look-ahead: sample ids per step as sampled."""
    return [ids for _, _, ids in run_world(ds, world, k=0, **kw)]


def test_every_sample_once_within_its_window_and_the_band() -> None:
    ds = dataset()
    world = 4
    got = run_world(ds, world, tokens_per_step=BUDGET, seed=3)
    sampled = sampled_steps(ds, world, tokens_per_step=BUDGET, seed=3)
    assert len(got) == len(sampled)
    assert sorted(s for _, _, ids in got for s in ids) == list(range(len(ds)))
    where = {s: t for t, ids in enumerate(sampled) for s in ids}
    moved = 0
    for t, tokens, ids in got:
        for s in ids:
            assert where[s] // K == t // K  # same window: never more than K − 1 steps away
            moved += where[s] != t
        # a step is inside the band, or exactly the sampled batch (the epoch's short last one)
        assert 0.9 * BUDGET <= tokens <= 1.1 * BUDGET or ids == sorted(sampled[t]), (t, tokens)
    assert moved > 0  # look-ahead did regroup


def test_regrouping_lowers_the_estimated_time() -> None:
    ds = dataset(seed=1)
    loader = BalancedDataLoader(ds, balancer=make_balancer(4), rank=0, world_size=4, plan_sync="none", tokens_per_step=BUDGET, seed=1)
    plain = BalancedDataLoader(ds, balancer=make_balancer(4, 0), rank=0, world_size=4, plan_sync="none", tokens_per_step=BUDGET, seed=1)
    with_la = sum(b.plan.est_step_seconds for b in loader)
    without = sum(b.plan.est_step_seconds for b in plain)
    assert with_la < without
    kinds = {name for _, _, name, _ in loader.sampler._lookahead.regroupings}
    assert kinds - {"sampled"}


def test_fixed_sequence_counts_stay_fixed() -> None:
    ds = dataset(seed=2)
    got = run_world(ds, 4, sequences_per_step=12, seed=2)
    assert [len(ids) for _, _, ids in got[:-1]] == [12] * (len(got) - 1)
    assert sorted(s for _, _, ids in got for s in ids) == list(range(len(ds)))


def test_every_epoch_once_and_different_orders() -> None:
    ds = dataset(90, seed=4)
    loader = BalancedDataLoader(ds, balancer=make_balancer(1 * 4), rank=0, world_size=4, plan_sync="none", tokens_per_step=BUDGET, seed=4)
    epochs = []
    for _ in range(2):
        steps = list(loader)
        epochs.append(([b.step for b in steps], [every(b) for b in steps]))
    (steps0, ids0), (steps1, ids1) = epochs
    assert steps1[0] == steps0[-1] + 1  # step numbers continue across the epoch boundary
    for ids in (ids0, ids1):  # every sample exactly once per epoch, windows never cross it
        assert sorted(s for step in ids for s in step) == list(range(len(ds)))
    assert ids0 != ids1  # each epoch its own shuffle, regrouped on its own


# -- resume -------------------------------------------------------------------------------------------
def _rank0(ds: datasets.Dataset, **kw: Any) -> BalancedDataLoader:
    bal = kw.pop("balancer", None) or make_balancer(4)
    return BalancedDataLoader(ds, balancer=bal, rank=0, world_size=4, plan_sync="none", tokens_per_step=BUDGET, seed=5, plan_ahead=3, **kw)


@pytest.mark.parametrize("stop", ["0", "1", "mid", "last"])
def test_resume_equals_the_uninterrupted_run(stop: str) -> None:
    ds = dataset(seed=5)
    reference = [(b.step, ids_of(b), b.plan.digest) for b in _rank0(ds)]
    n = len(reference)
    k = {"0": 0, "1": 1, "mid": K + 1, "last": n - 1}[stop]
    first = _rank0(ds)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    queue = state["sampler"]["lookahead"]["queue"]
    assert len(queue) == (0 if k % K == 0 else min(K - k % K, n - k))
    resumed = _rank0(ds)
    resumed.load_state_dict(copy.deepcopy(state))
    assert [(b.step, ids_of(b), b.plan.digest) for b in resumed] == reference[k:]
    assert [(b.step, ids_of(b), b.plan.digest) for b in it] == reference[k:]


def test_resume_with_another_pool_trains_the_saved_queue() -> None:
    """The queue wins over a recomputation: with other candidates the window would regroup
    differently, but every sample still trains exactly once."""
    ds = dataset(seed=6)
    world = 4
    loaders = [BalancedDataLoader(ds, balancer=make_balancer(world), rank=r, world_size=world, plan_sync="none", tokens_per_step=BUDGET) for r in range(world)]
    its = [iter(x) for x in loaders]
    seen: list[int] = []
    for _ in range(K + 1):  # stop inside the second window
        steps = [next(i) for i in its]
        seen += sorted({s for b in steps for s in ids_of(b)})
    states = [x.state_dict() for x in loaders]
    queued = states[0]["sampler"]["lookahead"]["queue"]
    assert queued
    other = [make_balancer(world, hetero=False) for _ in range(world)]
    resumed = [BalancedDataLoader(ds, balancer=other[r], rank=r, world_size=world, plan_sync="none", tokens_per_step=BUDGET) for r in range(world)]
    for r, x in enumerate(resumed):
        x.load_state_dict(states[r])
    rest = list(zip(*resumed))
    for j, q in enumerate(queued):  # the window's remaining steps are exactly the saved queue
        assert sorted({s for b in rest[j] for s in ids_of(b)}) == sorted(q)
    seen += [s for steps in rest for s in {s for b in steps for s in ids_of(b)}]
    assert sorted(seen) == list(range(len(ds)))


def _mid_state(ds: datasets.Dataset) -> dict[str, Any]:
    loader = _rank0(ds)
    it = iter(loader)
    for _ in range(K + 1):
        next(it)
    state = loader.state_dict()
    loader.close()
    return state


def test_resume_state_is_validated() -> None:
    ds = dataset(seed=5)
    state = _mid_state(ds)
    la = state["sampler"]["lookahead"]

    def refused(change: Any, match: str, **kw: Any) -> None:
        bad = copy.deepcopy(state)
        change(bad["sampler"]["lookahead"])
        with pytest.raises(ValueError, match=match):
            _rank0(ds, **kw).load_state_dict(bad)

    foreign = next(s for s in range(len(ds)) if all(s not in q for q in la["queue"]) and s < len(ds))

    refused(lambda x: x["queue"][0].append(foreign), f"names sequence {foreign}, which is not in the sampled window")
    refused(lambda x: x["queue"][-1].append(x["queue"][0][0]), "twice")
    refused(lambda x: x["queue"].pop(), "holds 1 steps")
    refused(lambda x: x.update(start=x["start"] + 1), "saved at epoch 0 step")
    refused(lambda x: x.update(version=9), "version")
    refused(lambda x: x.update(queue=[]), "queue is empty")
    with pytest.raises(ValueError, match=r"lookahead_steps=3\); build the balancer"):
        _rank0(ds, balancer=make_balancer(4, 0)).load_state_dict(copy.deepcopy(state))
    with pytest.raises(ValueError, match="lookahead_steps=3; build the balancer with BalancerConfig"):
        _rank0(ds, balancer=make_balancer(4, 4)).load_state_dict(copy.deepcopy(state))


def test_a_state_without_lookahead_finishes_its_window_as_sampled() -> None:
    """Turning look-ahead on mid-window: the window's first steps trained as sampled, so its
    rest does too; the next windows are regrouped; every sample exactly once."""
    ds = dataset(seed=7)
    plain = BalancedDataLoader(ds, balancer=make_balancer(4, 0), rank=0, world_size=4, plan_sync="none", tokens_per_step=BUDGET, seed=7)
    sampled = [every(b) for b in BalancedDataLoader(ds, balancer=make_balancer(4, 0), rank=0, world_size=4, plan_sync="none", tokens_per_step=BUDGET, seed=7)]
    it = iter(plain)
    for _ in range(K + 1):
        next(it)
    state = plain.state_dict()
    plain.close()
    assert "lookahead" not in state["sampler"]
    resumed = BalancedDataLoader(ds, balancer=make_balancer(4), rank=0, world_size=4, plan_sync="none", tokens_per_step=BUDGET, seed=7)
    resumed.load_state_dict(state)
    rest = [every(b) for b in resumed]
    assert rest[: K - 1] == sampled[K + 1 : 2 * K]
    assert sorted(s for ids in sampled[: K + 1] + rest for s in ids) == list(range(len(ds)))


def test_another_window_size_resumes_at_a_boundary_of_the_saved_windows() -> None:
    """Saved with k = 3 at step 3 (a boundary), resumed with k = 4: step 3 lies inside the
    new window 0..3, whose first steps trained in the old windows, so it runs as sampled."""
    ds = dataset(seed=5)
    sampled = [every(b) for b in _rank0(ds, balancer=make_balancer(4, 0))]
    first = _rank0(ds)
    it = iter(first)
    trained = [every(next(it)) for _ in range(K)]
    state = first.state_dict()
    first.close()
    assert state["sampler"]["lookahead"]["queue"] == []
    resumed = _rank0(ds, balancer=make_balancer(4, 4))
    resumed.load_state_dict(state)
    rest = [every(b) for b in resumed]
    assert rest[0] == sampled[K]
    assert sorted(s for ids in trained + rest for s in ids) == sorted(s for ids in sampled for s in ids)


def test_streaming_refuses_lookahead() -> None:
    class Stream(tud.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield {"input_ids": [1, 2, 3]}

    with pytest.raises(ValueError, match="needs a map-style dataset"):
        BalancedDataLoader(Stream(), balancer=make_balancer(4), world_size=4, plan_sync="none", rank=0, tokens_per_step=BUDGET)


# -- two real processes ---------------------------------------------------------------------------------
def _two_ranks(rank: int, world: int) -> dict[str, Any]:
    ds = dataset(seed=8)
    loader = BalancedDataLoader(ds, balancer=make_balancer(world), tokens_per_step=BUDGET, seed=8, plan_sync="verify")
    mine = [(b.plan.digest, b.rank_plan.replica_index, ids_of(b)) for b in loader]
    every: list[Any] = [None] * world
    dist.all_gather_object(every, [m[0] for m in mine])
    assert all(d == every[0] for d in every), f"rank {rank}: plans differ across ranks"
    return {"steps": mine, "regrouped": [name for _, _, name, _ in loader.sampler._lookahead.regroupings]}


def test_two_processes_agree_and_train_every_sample_once() -> None:
    got = run_ranks(_two_ranks, 2)
    seen = []
    for t in range(len(got[0]["steps"])):
        per_replica = {g["steps"][t][1]: g["steps"][t][2] for g in got}
        seen += [s for ids in per_replica.values() for s in ids]
    assert sorted(seen) == list(range(160))
    assert got[0]["regrouped"] == got[1]["regrouped"]
    assert set(got[0]["regrouped"]) - {"sampled"}
