"""Ranks that disagree fail fast, on every rank (real gloo processes): other seeds, per-rank
streams, an error on one rank while reading, planning or building a step, a peer that never
comes; and a streaming run on several ranks that resumes exactly at k ∈ {0, 1, mid, last}.

The job's timeout (``init_process_group(timeout=...)``) is short here; the plan group must
take it over, so a silent peer is noticed within it (run_ranks fails a test whose ranks
are still running after its own deadline: a hang can never pass).
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
from typing import Any, Iterator

import datasets
import pytest
import torch.utils.data as tud
from datasets.distributed import split_dataset_by_node
from test_dataloader_dist import make_balancer, rows, run_ranks

from dataloader import BalancedDataLoader, MicroBatchSpec, PackedCollator, SamplerStats
from dataloader.distributed import group_timeout_s


def _lengths(data: list[dict[str, Any]]) -> list[int]:
    return [len(d["input_ids"]) for d in data]


def _outcome(loader: Any) -> str:
    """``"ok <steps>"``, or the type and message of what iterating the loader raised."""
    steps = 0
    try:
        for _ in loader:
            steps += 1
    except Exception as e:  # noqa: BLE001 - the test checks which error, on which rank
        return f"{type(e).__name__}: {e}"
    return f"ok {steps}"


# -- diverged data ------------------------------------------------------------------------------------
def _seed_per_rank(rank: int, world: int, sync: str) -> str:
    data = [{"input_ids": r} for r in rows(60, seed=4)]
    loader = BalancedDataLoader(data, balancer=make_balancer(world, hetero=False), lengths=_lengths(data),
                                sequences_per_step=10, seed=100 + rank, plan_sync=sync)
    return _outcome(loader)


@pytest.mark.parametrize("sync", ["auto", "verify"])
def test_ranks_with_other_seeds_fail_on_every_rank_at_the_first_step(sync: str) -> None:
    for msg in run_ranks(_seed_per_rank, 2, sync):
        assert msg.startswith("PlanSyncError: ranks hold different global batches for step 0"), msg
        assert "seed" in msg and "per-rank shard" in msg


def _shard(rank: int, world: int, budget: dict[str, int], short: bool) -> str:
    data = rows(80, seed=5)
    full = datasets.Dataset.from_dict({"input_ids": data}).to_iterable_dataset(num_shards=4)
    if short:  # the same stream, but one rank's copy ends early
        stream = datasets.Dataset.from_dict({"input_ids": data[: 56 if rank else 80]}).to_iterable_dataset()
    else:  # what split_dataset_by_node gives each rank: a shard of its own
        stream = split_dataset_by_node(full, rank=rank, world_size=world)
    loader = BalancedDataLoader(stream, balancer=make_balancer(world, hetero=False), **budget)
    return _outcome(loader)


@pytest.mark.parametrize("budget", [{"sequences_per_step": 8}, {"tokens_per_step": 600}])
def test_per_rank_stream_shards_are_refused_on_every_rank(budget: dict[str, int]) -> None:
    for msg in run_ranks(_shard, 2, budget, False):
        assert msg.startswith("PlanSyncError: ranks hold different global batches for step 0"), msg
        assert "split_dataset_by_node" in msg and "same, complete stream" in msg
        assert "build the loader with stream_split='per_rank'" in msg  # the fix is named


def test_a_stream_that_ends_early_on_one_rank_is_refused_on_every_rank() -> None:
    for msg in run_ranks(_shard, 2, {"sequences_per_step": 8}, True):
        assert "PlanSyncError: ranks disagree on the epoch's length: rank(s) [1] reached the end" in msg, msg


# -- an error on one rank ------------------------------------------------------------------------------
class _Stream(tud.IterableDataset):  # type: ignore[type-arg]
    def __init__(self, data: list[list[int]]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for r in self.data:
            yield {"input_ids": r}


class _FailingPlanner:
    """A Balancer whose plans fail at one step (on the rank that has it)."""

    def __init__(self, inner: Any, at: int) -> None:
        self.inner, self.at = inner, at

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prefetch(self, batches: Any, depth: int = 2) -> Any:
        def check() -> Iterator[Any]:
            for item in batches:
                if item[0] == self.at:
                    raise RuntimeError(f"planner broke at step {item[0]}")
                yield item

        return self.inner.prefetch(check(), depth=depth)


class _FailingCollator(PackedCollator):
    def __call__(self, samples: Any, spec: MicroBatchSpec | None = None) -> Any:
        if spec is not None and spec.step == 2:
            raise ValueError("collate broke on this rank")
        return super().__call__(samples, spec)


def _one_rank_fails(rank: int, world: int, where: str, sync: str) -> str:
    data = rows(60, seed=6)
    balancer: Any = make_balancer(world, hetero=False)
    failing = rank == world - 1 if where != "plan" else rank == 0
    if where == "plan" and failing:
        balancer = _FailingPlanner(balancer, at=2)
    if where == "build-stream":
        collate = _FailingCollator() if failing else PackedCollator()
        loader = BalancedDataLoader(_Stream(data), balancer=balancer, sequences_per_step=6, collate_fn=collate, plan_sync=sync)
    else:
        items = [{"input_ids": r} for r in data]
        loader = BalancedDataLoader(items, balancer=balancer, lengths=_lengths(items), sequences_per_step=6, shuffle=False, plan_sync=sync)
        if where == "build-map" and failing:
            build = loader.sampler._build_step

            def broken(batch: Any, plan: Any) -> Any:
                if batch.step == 2:
                    raise ValueError("building step 2 broke on this rank")
                return build(batch, plan)

            loader.sampler._build_step = broken  # type: ignore[method-assign]
    return _outcome(loader)


@pytest.mark.parametrize(
    ("where", "sync", "text"),
    [
        ("plan", "broadcast", "RuntimeError: planner broke at step 2"),
        ("build-map", "broadcast", "ValueError: building step 2 broke on this rank"),
        ("build-map", "verify", "ValueError: building step 2 broke on this rank"),
        ("build-stream", "broadcast", "ValueError: collate broke on this rank"),
    ],
)
def test_an_error_on_one_rank_is_raised_on_every_rank(where: str, sync: str, text: str) -> None:
    world = 3
    got = run_ranks(_one_rank_fails, world, where, sync, timeout_s=120.0)
    failing = 0 if where == "plan" else world - 1
    for r, msg in enumerate(got):
        if r == failing:
            assert msg == text, msg  # the rank that failed raises its own error
        else:
            assert msg.startswith(f"PlanSyncError: rank {failing} failed at step 2: {text}"), msg


# -- a silent peer ---------------------------------------------------------------------------------------
def _silent_peer(rank: int, world: int, sync_timeout_s: float | None, done: Any) -> Any:
    data = [{"input_ids": r} for r in rows(30, seed=7)]
    loader = BalancedDataLoader(data, balancer=make_balancer(world, hetero=False), lengths=_lengths(data),
                                sequences_per_step=6, sync_timeout_s=sync_timeout_s)
    if rank == 1:  # builds the loader (a collective) but never iterates it
        done.wait(120)
        return None
    try:
        return group_timeout_s(loader.sampler._group), _outcome(loader)
    finally:
        done.set()


@pytest.mark.parametrize(("job_timeout_s", "sync_timeout_s"), [(4.0, None), (120.0, 2.0)])
def test_a_silent_peer_is_noticed_within_the_jobs_timeout(job_timeout_s: float, sync_timeout_s: float | None) -> None:
    done = mp.get_context("fork").Event()
    (timeout, msg), _ = run_ranks(_silent_peer, 2, sync_timeout_s, done, timeout_s=job_timeout_s)
    limit = sync_timeout_s or job_timeout_s
    assert timeout == pytest.approx(limit)  # the plan group's own timeout, not torch's 30-minute default
    assert msg.startswith("PlanSyncError: plan exchange") and f"within the plan group's timeout ({limit:g} s)" in msg, msg


# -- streaming on several ranks: resume at k ∈ {0, 1, mid, last} -----------------------------------------------
def _stream_resume(rank: int, world: int) -> dict[str, Any]:
    data = rows(70, seed=8)

    def loader() -> BalancedDataLoader:
        return BalancedDataLoader(_Stream(data), balancer=make_balancer(world, hetero=True), tokens_per_step=700, plan_ahead=2)

    def seqs(batch: Any) -> tuple[int, int, list[tuple[int, ...]]]:
        return batch.step, batch.epoch, [tuple(sp.sample_ids) for sp in batch.specs]

    full = loader()
    reference = [seqs(b) for b in full]
    one_epoch = dataclasses.replace(full.stats)
    reference += [seqs(b) for b in full]  # two epochs
    n = len(reference) // 2
    out: dict[str, Any] = {"steps": n, "reference": reference, "resumed": {}, "stats": [one_epoch, full.stats]}
    for k in sorted({0, 1, n // 2, n}):
        first = loader()
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        first.close()
        it.close()
        again = loader()
        again.load_state_dict(state)
        assert again.stats == SamplerStats()  # stats are this process's: not saved, not restored
        out["resumed"][k] = [seqs(b) for b in again]
    return out


def test_streaming_on_several_ranks_resumes_exactly_at_every_k() -> None:
    got = run_ranks(_stream_resume, 3, timeout_s=120.0)
    n = got[0]["steps"]
    assert n >= 4
    for g in got:
        ref = g["reference"]
        assert set(g["resumed"]) == {0, 1, n // 2, n}
        for k, rest in g["resumed"].items():
            # The rest of the epoch; a state saved after its last step continues with the next epoch.
            want = ref[k:n] if k < n else ref[n:]
            assert [tuple(x) for x in rest] == [tuple(x) for x in want], f"resumed at {k}"
    for g in got:  # replicated: every rank reads the whole stream, exchanges no samples, waits in the plan exchanges
        one, two = g["stats"]
        assert two.exchange_seconds == one.exchange_seconds == 0 and two.received_sample_bytes == 0
        for k in ("read_seconds", "collective_seconds", "plan_seconds"):
            assert 0 < getattr(one, k) < getattr(two, k), k
    # every stream sample exactly once per epoch over the replicas of every step
    seen: list[int] = []
    for t in range(n):
        replicas = {tuple(g["reference"][t][2]) for g in got}
        seen += [i for rep in replicas for mb in rep for i in mb]
    assert sorted(seen) == list(range(70))
