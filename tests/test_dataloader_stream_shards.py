"""Per-rank streams (``stream_split='per_rank'``, dataloader.stream_shards) on real gloo processes.

Every rank reads its own shard — a torch ``IterableDataset`` of a rank-specific slice, and a
Hugging Face stream split by ``split_dataset_by_node`` — of uneven sizes. Checked: every
rank derives the same plan and runs its part of it (tensor-parallel peers the same
micro-batches); the collated micro-batches hold the planned samples' tokens; every sample
of every shard is trained exactly once per epoch; one step's all-reduced gradient equals a
single process's on the same global batch; resume at k ∈ {0, 1, mid, last} equals the
uninterrupted run; a state resumed on another world size or another shard is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.utils.data as tud
from datasets.distributed import split_dataset_by_node
from test_dataloader_dist import TinyLM, make_balancer, reference_grads, rows, run_ranks

from dataloader import BalancedDataLoader, SamplerConfig
from dataloader.loss import packed_loss
from dataloader.stream_shards import shard_budget
from strategies.plan import StepPlan

SHARD_SIZES = (23, 14, 4)
"""Samples per rank's stream (uneven: rank 2's ends after its first step or two)."""


def shard_rows(rank: int) -> list[list[int]]:
    return rows(SHARD_SIZES[rank], seed=20 + rank, high=200)  # up to 199 tokens: longer ones need tp=2 (cap 256)


class RankSlice(tud.IterableDataset):  # type: ignore[type-arg]
    """A stream of this rank's own samples (what per-rank files give)."""

    def __init__(self, data: list[list[int]]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for r in self.data:
            yield {"input_ids": r}


def _tokens(mb: dict[str, Any]) -> list[int]:
    return mb["input_ids"].reshape(-1).tolist()


def _step_record(batch: Any, data: list[list[list[int]]]) -> dict[str, Any]:
    """The plan, this rank's replica and micro-batches, after checking the collated tokens against the shards."""
    world = len(data)
    for spec, mb in zip(batch.specs, batch.micro_batches):
        assert mb["sample_ids"].tolist() == list(spec.sample_ids)
        want = [t for sid, lo, hi in zip(spec.sample_ids, spec.starts, spec.ends) for t in data[sid % world][sid // world][lo:hi]]
        assert _tokens(mb) == want, f"step {batch.step}: collated tokens are not the planned samples'"
    return {
        "step": batch.step,
        "epoch": batch.epoch,
        "plan": batch.plan.canonical_json(),
        "replica": batch.rank_plan.replica_index,
        "micro_batches": [list(sp.sample_ids) for sp in batch.specs],
    }


# -- a torch IterableDataset per rank: plans, tokens, exactly once, resume at every k ------------------------
def _torch_shards(rank: int, world: int) -> dict[str, Any]:
    data = [shard_rows(r) for r in range(world)]

    def loader() -> BalancedDataLoader:
        return BalancedDataLoader(RankSlice(data[rank]), balancer=make_balancer(world, hetero=True), tokens_per_step=900,
                                  stream_split="per_rank", plan_ahead=2)

    full = loader()
    reference = [_step_record(b, data) for b in full] + [_step_record(b, data) for b in full]  # two epochs
    n = len(reference) // 2
    out: dict[str, Any] = {"steps": n, "reference": reference, "resumed": {}, "states": {}}
    again = loader()
    for i, b in enumerate(again):  # break off and iterate again: continues after the last consumed step
        if i == 1:
            break
    out["continued"] = [_step_record(b, data) for b in again]
    for k in sorted({0, 1, n // 2, n}):
        first = loader()
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        it.close()
        first.close()
        again = loader()
        again.load_state_dict(copy.deepcopy(state))
        out["resumed"][k] = [_step_record(b, data) for b in again]
        out["states"][k] = state
    return out


def test_per_rank_streams_plan_together_train_every_sample_once_and_resume_exactly() -> None:
    world = 3
    got = run_ranks(_torch_shards, world, timeout_s=120.0)
    n = got[0]["steps"]
    assert n >= 4
    shared_replicas = 0
    for t in range(2 * n):
        plans = {g["reference"][t]["plan"] for g in got}
        assert len(plans) == 1, f"step {t}: ranks hold different plans"
        plan = StepPlan.from_json(plans.pop())
        by_replica: dict[int, list[int]] = {}
        for r, g in enumerate(got):  # every rank, tensor-parallel peers included, runs its part of the plan
            rank_plan = plan.for_rank(r)
            assert g["reference"][t]["replica"] == rank_plan.replica_index
            assert g["reference"][t]["micro_batches"] == [list(mb) for mb in rank_plan.micro_batches], f"step {t}, rank {r}"
            by_replica.setdefault(rank_plan.replica_index, []).append(r)
        shared_replicas += any(len(m) > 1 for m in by_replica.values())
    assert shared_replicas > 0, "the test needs steps with a tensor-parallel replica (peers receive the same samples)"
    for epoch in range(2):  # every sample of every shard exactly once per epoch, over the replicas of every step
        seen: list[int] = []
        for t in range(epoch * n, (epoch + 1) * n):
            plan = StepPlan.from_json(got[0]["reference"][t]["plan"])
            assert got[0]["reference"][t]["epoch"] == epoch
            seen += plan.sample_ids()
        assert sorted(seen) == sorted(p * world + r for r, size in enumerate(SHARD_SIZES) for p in range(size))
    for g in got:
        ref = g["reference"]
        assert g["continued"] == ref[2:n]  # steps 0 and 1 were yielded before the break
        assert set(g["resumed"]) == {0, 1, n // 2, n}
        for k, rest in g["resumed"].items():
            want = ref[k:n] if k < n else ref[n : 2 * n]  # a state saved after the last step continues with epoch 1
            assert rest == want, f"resumed at {k}"
    # The state saved on one rank holds every rank's position: the same dict on every rank.
    for k in (1, n // 2):
        assert all(g["states"][k] == got[0]["states"][k] for g in got)
        state = got[0]["states"][k]["stream"]
        assert len(state["shards"]) == world and sum(s["samples_consumed"] for s in state["shards"]) == state["samples_consumed"]


# -- a Hugging Face stream split by split_dataset_by_node -------------------------------------------------
HF_ROWS = 41  # odd: rank 0's shard holds one more sample


def _hf_stream(rank: int, world: int, data: list[list[int]]) -> Any:
    full = datasets.Dataset.from_dict({"input_ids": data}).to_iterable_dataset()
    return split_dataset_by_node(full, rank=rank, world_size=world)  # one shard: rank r keeps samples i % world == r


def _hf_shards(rank: int, world: int, budget: dict[str, int]) -> dict[str, Any]:
    data = rows(HF_ROWS, seed=9)
    loader = BalancedDataLoader(_hf_stream(rank, world, data), balancer=make_balancer(world, hetero=False),
                                stream_split="per_rank", **budget)
    ids: list[list[int]] = []
    first_grads: dict[str, np.ndarray] = {}
    state: dict[str, Any] = {}
    for batch in loader:
        for spec, mb in zip(batch.specs, batch.micro_batches):  # sample ids are the full dataset's row indices here
            want = [t for sid, lo, hi in zip(spec.sample_ids, spec.starts, spec.ends) for t in data[sid][lo:hi]]
            assert _tokens(mb) == want
        ids.append(batch.plan.sample_ids())
        if batch.step == 0:  # one training step: the all-reduced gradient of the balanced, normalised loss
            torch.manual_seed(0)
            model = TinyLM()
            for k, mb in enumerate(batch.micro_batches):
                if mb["input_ids"].numel():
                    packed_loss(model(mb["input_ids"], mb["position_ids"]), mb).backward()
            for name, p in model.named_parameters():
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                dist.all_reduce(grad)
                first_grads[name] = grad.numpy().copy()
        if batch.step == 1:
            state = loader.state_dict()
    # Resume from step 2 where rank 1's shard was re-tokenised (one sample it skips is one token shorter).
    other = [list(r) for r in data]
    if rank == 1:
        other[1] = other[1][:-1]
    again = BalancedDataLoader(_hf_stream(rank, world, other), balancer=make_balancer(world, hetero=False),
                               stream_split="per_rank", **budget)
    again.load_state_dict(copy.deepcopy(state))
    try:
        list(again)
        refused = "no error"
    except Exception as e:  # noqa: BLE001 - the test checks which error, on which rank
        refused = f"{type(e).__name__}: {e}"
    received = loader.stats.received_sample_bytes
    one_epoch = _timings(loader.stats)
    for _ in loader:  # a second epoch: every counter of the planning thread's work grows
        pass
    return {"ids": ids, "grads": first_grads, "state": state, "refused": refused, "received": received,
            "timings": [one_epoch, _timings(loader.stats)]}


TIMINGS = ("read_seconds", "exchange_seconds", "collective_seconds", "plan_seconds")


def _timings(stats: Any) -> dict[str, float]:
    return {k: getattr(stats, k) for k in TIMINGS}


@pytest.mark.parametrize("budget", [{"sequences_per_step": 8}, {"tokens_per_step": 900, "plan_sync": "verify"}])
def test_split_dataset_by_node_streams_train_like_one_process(budget: dict[str, int]) -> None:
    world = 2
    got = run_ranks(_hf_shards, world, budget, timeout_s=120.0)
    data = rows(HF_ROWS, seed=9)
    assert got[0]["ids"] == got[1]["ids"]
    assert all(g["received"] > 0 for g in got)  # samples moved to the rank whose micro-batches hold them
    assert sorted(i for step in got[0]["ids"] for i in step) == list(range(HF_ROWS))  # every sample once, none lost
    if "sequences_per_step" in budget:
        assert [len(s) for s in got[0]["ids"]] == [8] * 5 + [1]  # 4 + 4 per step; rank 0's 21st sample last
    for g in got:  # every rank read its shard, pickled and exchanged samples, and waited in collectives
        one, two = g["timings"]
        assert all(one[k] > 0 for k in TIMINGS), one
        assert all(two[k] > one[k] for k in TIMINGS), (one, two)
    want = reference_grads(data, got[0]["ids"][0])
    for g in got:
        for name, ref in want.items():
            np.testing.assert_allclose(g["grads"][name], ref, rtol=1e-4, atol=1e-6, err_msg=name)
    # Another shard on rank 1: refused on every rank (rank 1 by its own check, rank 0 told in the exchange).
    assert got[1]["refused"].startswith("ValueError: cannot resume: the first "), got[1]["refused"]
    assert "the state's shards[1] says consumed_fingerprint=" in got[1]["refused"]
    assert got[0]["refused"].startswith("PlanSyncError: rank 1 failed at step 2: ValueError: cannot resume"), got[0]["refused"]
    # Another world size: refused when the state is loaded, naming both sizes.
    state = got[0]["state"]
    options = {k: v for k, v in budget.items() if k != "plan_sync"}  # one process: nothing to exchange
    one = BalancedDataLoader(_hf_stream(0, 1, data), balancer=make_balancer(1, hetero=False), stream_split="per_rank", **options)
    with pytest.raises(ValueError, match="saved on world_size=2 ranks, this loader runs on 1") as e:
        one.load_state_dict(state)
    assert "shards[r]" in str(e.value) and "Resume on 2 ranks" in str(e.value)


# -- one process: options, state fields ----------------------------------------------------------------------
def _edited(state: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(state)
    out.update(changes)
    return out


def _one_rank_state() -> tuple[Any, dict[str, Any]]:
    data = rows(12, seed=3)
    loader = BalancedDataLoader(RankSlice(data), balancer=make_balancer(1, hetero=False), sequences_per_step=3, stream_split="per_rank")
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()["stream"]
    it.close()
    return data, state


def test_one_rank_per_rank_stream_is_the_replicated_stream() -> None:
    data = rows(20, seed=2)

    def steps(split: str) -> list[list[int]]:
        loader = BalancedDataLoader(RankSlice(data), balancer=make_balancer(1, hetero=False), tokens_per_step=300, stream_split=split)
        return [sorted(b.plan.sample_ids()) for b in loader]

    assert steps("per_rank") == steps("replicated")
    empty = BalancedDataLoader(RankSlice([]), balancer=make_balancer(1, hetero=False), tokens_per_step=300, stream_split="per_rank")
    with pytest.raises(ValueError, match=r"no rank's stream had a sample to train on in epoch 0 \(samples read per rank: \[0\]\)"):
        list(empty)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"shards": [{"samples_consumed": 6, "consumed_fingerprint": "blake2b:00"}] * 2}, "shards=2 entries; it must be a list of one entry per rank"),
        ({"shards": "x"}, "shards='x'"),
        ({"shards": [{"samples_consumed": 6}]}, r"shards\[0\]=\{'samples_consumed': 6\}; it must be a dict with"),
        ({"shards": [{"samples_consumed": -1, "consumed_fingerprint": "blake2b:00"}]}, r"stream shards\[0\] state has samples_consumed=-1"),
        ({"shards": [{"samples_consumed": 6, "consumed_fingerprint": 7}]}, r"shards\[0\].consumed_fingerprint=7"),
        ({"shards": [{"samples_consumed": 5, "consumed_fingerprint": "blake2b:00"}]}, "samples_consumed=6 but its shards sum to 5"),
    ],
)
def test_per_rank_state_fields_are_checked(changes: dict[str, Any], message: str) -> None:
    data, state = _one_rank_state()
    assert state["samples_consumed"] == 6 and state["batching"]["stream_split"] == "per_rank"
    loader = BalancedDataLoader(RankSlice(data), balancer=make_balancer(1, hetero=False), sequences_per_step=3, stream_split="per_rank")
    with pytest.raises(ValueError, match=message):
        loader.load_state_dict({"version": 1, "stream": _edited(state, **changes)})
    replicated = BalancedDataLoader(RankSlice(data), balancer=make_balancer(1, hetero=False), sequences_per_step=3)
    with pytest.raises(ValueError, match="stream_split changed 'per_rank' → 'replicated'"):
        replicated.load_state_dict({"version": 1, "stream": state})


def test_per_rank_options_are_checked() -> None:
    with pytest.raises(ValueError, match="stream_split='shards'; choose one of"):
        SamplerConfig(sequences_per_step=4, stream_split="shards")
    assert shard_budget(1000, None, 3) == (333, None) and shard_budget(None, 12, 3) == (None, 4)
    with pytest.raises(ValueError, match="sequences_per_step=8 is not a multiple of world_size=3.*Use 6 or 9"):
        shard_budget(None, 8, 3)
    with pytest.raises(ValueError, match="tokens_per_step=2 is below world_size=3"):
        shard_budget(2, None, 3)
    data = rows(8, seed=1)
    bal = make_balancer(2, hetero=False)
    with pytest.raises(ValueError, match="needs an initialised torch.distributed and plan_sync"):
        BalancedDataLoader(RankSlice(data), balancer=bal, sequences_per_step=4, stream_split="per_rank", rank=0, world_size=2, plan_sync="none")
    with pytest.raises(ValueError, match="drop_last=True is not supported with it"):
        BalancedDataLoader(RankSlice(data), balancer=make_balancer(1, hetero=False), sequences_per_step=4, stream_split="per_rank", drop_last=True)
    with pytest.raises(ValueError, match="applies to streaming \\(iterable\\) datasets"):
        BalancedDataLoader([{"input_ids": r} for r in data], balancer=make_balancer(1, hetero=False), lengths=[len(r) for r in data],
                           sequences_per_step=4, stream_split="per_rank")
