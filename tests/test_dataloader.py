"""BalancedDataLoader: map-style with workers, wrap(), labels, errors, resume, and streaming."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Iterator

import datasets
import numpy as np
import pytest
import torch
import torch.utils.data as tud

from balancer.cost import CostModel, LayoutCost
from balancer.selector import Balancer
from dataloader import BalancedDataLoader, PaddedCollator, SamplerStats, StepBatch
from strategies.layout import ClusterSpec, Layout, Strategy

CAP = 64


def make_balancer(world: int) -> Balancer:
    """tp1 holds CAP tokens (2·CAP on a single rank), tp2 holds 2·CAP: every row below fits some candidate."""
    tp1 = CAP if world > 1 else 2 * CAP
    cost = CostModel.from_coefficients({"tp1": (1e-6, 1e-4, 1e-3, tp1), "tp2": (0.6e-6, 0.6e-4, 1e-3, 2 * CAP)})
    cands = [Strategy.homogeneous(Layout(tp=1), world)]
    if world % 2 == 0:
        cands.append(Strategy.homogeneous(Layout(tp=2), world))
    return Balancer(ClusterSpec(num_ranks=world), cands, cost)


def token_rows(n: int, seed: int = 0, high: int = 2 * CAP) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 500, size=int(k)).tolist() for k in rng.integers(1, high, size=n)]


def hf_dataset(n: int = 60, seed: int = 0, **extra: Any) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": token_rows(n, seed), **extra})


def sequences(batch: StepBatch) -> list[tuple[int, list[int]]]:
    """(sample id, tokens) of every sequence of this rank's step, from the collated tensors."""
    out = []
    for mb in batch.micro_batches:
        cu = mb["cu_seqlens"].tolist()
        ids = mb["input_ids"][0].tolist()
        for j, sid in enumerate(mb["sample_ids"].tolist()):
            out.append((sid, ids[cu[j] : cu[j + 1]]))
    return out


def test_every_sample_once_and_tokens_match_the_dataset() -> None:
    ds = hf_dataset()
    rows = ds["input_ids"]
    seen: dict[int, list[int]] = {}
    world = 2
    loaders = [BalancedDataLoader(ds, balancer=make_balancer(world), tokens_per_step=400, rank=r, world_size=world, plan_sync="none") for r in range(world)]
    for steps in zip(*loaders):
        assert len({b.plan.digest for b in steps}) == 1
        replicas: dict[int, list[tuple[int, list[int]]]] = {}
        for b in steps:
            assert b.global_loss_tokens == b.plan.global_loss_tokens
            assert sum(mb["num_loss_tokens"] for b2 in [b] for mb in b2.micro_batches) == sum(b.num_loss_tokens(k) for k in range(b.num_micro_batches))
            replicas.setdefault(b.rank_plan.replica_index, sequences(b))
        for seqs in replicas.values():
            for sid, toks in seqs:
                assert sid not in seen
                seen[sid] = toks
    assert sorted(seen) == list(range(len(ds)))
    assert all(seen[i] == rows[i] for i in seen)


def test_workers_give_the_same_batches_as_the_main_process() -> None:
    ds = hf_dataset(40)
    kw = dict(balancer=make_balancer(1), sequences_per_step=6, seed=2)
    main = [sequences(b) for b in BalancedDataLoader(ds, **kw)]
    pooled = [sequences(b) for b in BalancedDataLoader(ds, num_workers=2, prefetch_factor=2, **kw)]
    assert main == pooled


def test_step_batch_sync_control() -> None:
    ds = hf_dataset(30)
    batch = next(iter(BalancedDataLoader(ds, balancer=make_balancer(1), tokens_per_step=10_000)))
    n = batch.num_micro_batches
    assert n >= 2  # 30 samples of up to 128 tokens cannot fit one 128-token micro-batch
    assert [batch.is_last_micro_batch(k) for k in range(n)] == [False] * (n - 1) + [True]

    class DDPLike:
        def __init__(self) -> None:
            self.calls = 0

        @contextlib.contextmanager
        def no_sync(self) -> Iterator[None]:
            self.calls += 1
            yield

    model = DDPLike()
    for k in range(n):
        with batch.sync_context(model, k):
            pass
    assert model.calls == n - 1
    with pytest.raises(IndexError):
        batch.is_last_micro_batch(n)

    fsdp = FSDP2Recorder()
    for k in range(n):
        with batch.sync_context(fsdp, k):
            pass
    hold = [("sync", False, True), ("after_backward", False, True), ("after_forward", False, True)]
    last = [("sync", True, True), ("after_backward", True, True), ("after_forward", True, True),
            ("after_forward", False, False)]  # fully_shard's default back: inner modules reshard, the root not
    assert fsdp.calls == hold * (n - 1) + last


def tp1_balancer(world: int) -> Balancer:
    """Data parallelism only (the FSDP2 case): tp1 on every rank, CAP tokens per micro-batch."""
    cost = CostModel.from_coefficients({Layout(1): TP1})
    return Balancer(ClusterSpec(num_ranks=world), [Strategy.homogeneous(Layout(tp=1), world)], cost)


TP1 = LayoutCost(a=1e-6, b=1e-4, c=1e-3, token_capacity=CAP)


def short_rows(n: int, seed: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": token_rows(n, seed, high=CAP)})


class FSDP2Recorder:  # the FSDPModule setters sync_context uses (the real one: tests/test_fsdp2.py)
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, bool]] = []

    def set_requires_gradient_sync(self, value: bool, *, recurse: bool = True) -> None:
        self.calls.append(("sync", value, recurse))

    def set_reshard_after_backward(self, value: bool, *, recurse: bool = True) -> None:
        self.calls.append(("after_backward", value, recurse))

    def set_reshard_after_forward(self, value: bool, recurse: bool = True) -> None:
        self.calls.append(("after_forward", value, recurse))


def test_lockstep_micro_batches_same_count_longest_first_zero_loss_pads() -> None:
    from dataloader import packed_loss
    from dataloader.batch import pad_micro_batch

    ds = short_rows(80, seed=3)
    world = 2
    loaders = [BalancedDataLoader(ds, balancer=tp1_balancer(world), tokens_per_step=600, rank=r, world_size=world,
                                  plan_sync="none") for r in range(world)]
    uneven = 0
    for steps in zip(*loaders):
        count = max(len(r.micro_batches) for r in steps[0].plan.replicas)
        uneven += len({b.num_micro_batches for b in steps}) > 1
        for b in steps:
            assert b.num_lockstep_micro_batches == count
            got = b.lockstep_micro_batches()
            assert [k for k, _ in got] == list(range(count))
            real = [mb for _, mb in got[: b.num_micro_batches]]
            assert real == b.micro_batches  # the plan's order, which is longest first by the balancer's cost:
            planned = [TP1.micro_batch_seconds(mb["seq_lens"].tolist()) for mb in real]
            assert planned == sorted(planned, reverse=True)
            for _, pad in got[b.num_micro_batches :]:
                assert pad["input_ids"].shape == (1, 1) and pad["labels"].tolist() == [[-100]]
                assert pad["cu_seqlens"].tolist() == [0, 1] and pad["global_loss_tokens"] == b.global_loss_tokens
            resorted = [mb for _, mb in b.lockstep_micro_batches(cost=QuadraticCost())[: b.num_micro_batches]]
            seconds = [QuadraticCost().micro_batch_seconds(mb["seq_lens"].tolist()) for mb in resorted]
            assert seconds == sorted(seconds, reverse=True)  # re-sorted by the given cost
            assert sorted(map(id, resorted)) == sorted(map(id, b.micro_batches))  # each micro-batch once
    assert uneven  # the case lockstep exists for: some step gave the ranks different counts

    # a pad adds exactly zero to every gradient (the one-token row's loss is 0·Σ logits)
    emb = torch.nn.Embedding(500, 8)
    head = torch.nn.Linear(8, 500)
    pad = pad_micro_batch(steps[0].micro_batches[0])
    loss = packed_loss(head(emb(pad["input_ids"])), pad, grad_divisor=world)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in (*emb.parameters(), *head.parameters()))


class QuadraticCost:
    """A cost whose quadratic term dominates: one long sequence outweighs many short ones of more tokens."""

    def micro_batch_seconds(self, seq_lens: list[int]) -> float:
        return float(sum(s * s for s in seq_lens))


def test_sync_context_reshard_mode_and_its_errors() -> None:
    ds = hf_dataset(30)
    batch = next(iter(BalancedDataLoader(ds, balancer=make_balancer(1), tokens_per_step=1_000)))
    fsdp = FSDP2Recorder()
    with pytest.raises(RuntimeError, match="lockstep_micro_batches"):  # a rank with fewer would hang its peers
        batch.sync_context(fsdp, 0, mode="reshard")
    with pytest.raises(ValueError, match="accumulate, reshard"):
        batch.sync_context(fsdp, 0, mode="lockstep")
    with pytest.raises(TypeError, match="micro_batch_seconds"):
        batch.lockstep_micro_batches(cost=1.0)
    steps = batch.lockstep_micro_batches()
    for k, _ in steps:
        with batch.sync_context(fsdp, k, mode="reshard"):
            pass
    every = [("sync", True, True), ("after_backward", True, True), ("after_forward", True, True),
             ("after_forward", False, False)]  # fully_shard's defaults at every micro-batch
    assert fsdp.calls == every * len(steps)
    with pytest.raises(IndexError, match="lockstep micro-batch"):
        batch.sync_context(fsdp, len(steps), mode="reshard")
    with pytest.raises(IndexError, match="mode='reshard'"):  # lockstep k past this rank's own count
        batch.sync_context(fsdp, batch.num_micro_batches, mode="accumulate")

    def my_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(samples)}

    two = [BalancedDataLoader(short_rows(80, seed=3), balancer=tp1_balancer(2), tokens_per_step=600, rank=r,
                              world_size=2, plan_sync="none", collate_fn=my_collate) for r in range(2)]
    for pair in zip(*two):
        short = min(pair, key=lambda b: b.num_micro_batches)
        if short.num_micro_batches < short.num_lockstep_micro_batches:
            with pytest.raises(ValueError, match="Pass pad="):  # no default pad for a collator of the user's
                short.lockstep_micro_batches()
            assert short.lockstep_micro_batches(pad={"n": 0})[-1][1] == {"n": 0}
            break
    else:
        pytest.fail("no step gave the two ranks different micro-batch counts")


def test_wrap_keeps_the_loaders_settings_and_collate() -> None:
    ds = hf_dataset(24)
    calls: list[int] = []

    def my_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        calls.append(len(samples))
        return {"n": len(samples), "tokens": sum(len(s["input_ids"]) for s in samples)}

    def init(worker_id: int) -> None:
        torch.manual_seed(worker_id)

    plain = tud.DataLoader(ds, batch_size=4, collate_fn=my_collate, num_workers=2, prefetch_factor=3, persistent_workers=True, worker_init_fn=init)
    wrapped = BalancedDataLoader.wrap(plain, balancer=make_balancer(1), sequences_per_step=5)
    inner = wrapped._loader
    assert inner.num_workers == 2 and inner.prefetch_factor == 3 and inner.persistent_workers
    assert inner.worker_init_fn is init and inner.pin_memory is False
    assert wrapped.collate_fn is my_collate
    for _ in range(2):  # persistent workers serve both epochs
        steps = list(wrapped)
        assert sum(mb["n"] for b in steps for mb in b.micro_batches) == 24
    default = BalancedDataLoader.wrap(tud.DataLoader(ds, batch_size=4), balancer=make_balancer(1), sequences_per_step=5)
    first = next(iter(default)).micro_batches[0]
    assert "cu_seqlens" in first  # torch's default_collate cannot batch ragged rows: packed instead


def test_padded_collator_through_the_loader() -> None:
    ds = hf_dataset(12)
    b = next(iter(BalancedDataLoader(ds, balancer=make_balancer(1), sequences_per_step=4, collate_fn=PaddedCollator())))
    mb = b.micro_batches[0]
    assert mb["input_ids"].shape == mb["attention_mask"].shape


def test_masked_labels_are_counted_from_the_dataset() -> None:
    rows = token_rows(20, seed=3)
    labels = [[-100] * (len(r) // 2) + r[len(r) // 2 :] for r in rows]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": labels})
    loader = BalancedDataLoader(ds, balancer=make_balancer(1), sequences_per_step=5)
    want = sum(sum(1 for t in lab[1:] if t != -100) for lab in labels)
    got = 0
    for b in loader:
        assert sum(mb["num_loss_tokens"] for mb in b.micro_batches) == b.global_loss_tokens
        got += b.global_loss_tokens
    assert got == want


def test_split_samples_with_masked_labels_keep_every_target_once() -> None:
    rows = [list(range(1, 301)), list(range(1, 11))]
    labels = [[-100] * 150 + rows[0][150:], rows[1]]
    ds = datasets.Dataset.from_dict({"input_ids": rows, "labels": labels})
    with pytest.warns(UserWarning, match="split 1 sample"):
        loader = BalancedDataLoader(ds, balancer=make_balancer(1), sequences_per_step=2, overlong="split")
    (batch,) = list(loader)
    assert batch.global_loss_tokens == 150 + 9
    assert sum(mb["num_loss_tokens"] for mb in batch.micro_batches) == 150 + 9
    assert loader.stats.split == 1


def test_lengths_that_do_not_match_the_dataset_name_the_sample() -> None:
    ds = hf_dataset(10)
    wrong = np.array([len(r) for r in ds["input_ids"]])
    wrong[4] += 1
    with pytest.raises(ValueError, match=f"sample 4 has {wrong[4] - 1} tokens in the dataset but the length source says {wrong[4]}"):
        list(BalancedDataLoader(ds, balancer=make_balancer(1), lengths=wrong, sequences_per_step=10))
    with pytest.raises(ValueError, match="has 9 entries but the dataset has 10 samples"):
        BalancedDataLoader(ds, balancer=make_balancer(1), lengths=wrong[:9], sequences_per_step=10)
    with pytest.raises(ValueError, match="no column 'tokens'"):
        BalancedDataLoader(ds, balancer=make_balancer(1), lengths="tokens", sequences_per_step=10)


def test_overlong_sample_error_through_the_loader() -> None:
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * 5, [1] * 500]})
    with pytest.raises(ValueError, match="sample 1 has 500 tokens, above the largest capacity 128"):
        BalancedDataLoader(ds, balancer=make_balancer(1), sequences_per_step=2)


def test_plain_map_dataset_with_lengths() -> None:
    rows = token_rows(16, seed=5)

    class Rows(tud.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.tensor(rows[i])

    loader = BalancedDataLoader(Rows(), balancer=make_balancer(1), lengths=[len(r) for r in rows], sequences_per_step=4)
    got = sorted(sid for b in loader for sid, _ in sequences(b))
    assert got == list(range(16))
    # without lengths= a plain dataset is read once for them: the same lengths, the same plans
    read = BalancedDataLoader(Rows(), balancer=make_balancer(1), sequences_per_step=4)
    assert read.sampler.lengths.tolist() == [len(r) for r in rows]
    assert sorted(sid for b in read for sid, _ in sequences(b)) == got


@pytest.mark.parametrize("k", [0, 1, 3])
def test_loader_resume_counts_consumed_steps_not_prefetched_ones(k: int) -> None:
    ds = hf_dataset(80, seed=7)
    kw = dict(tokens_per_step=500, seed=4, plan_ahead=3)
    reference = [sequences(b) for b in BalancedDataLoader(ds, balancer=make_balancer(2), rank=0, world_size=2, plan_sync="none", **kw)]
    first = BalancedDataLoader(ds, balancer=make_balancer(2), rank=0, world_size=2, plan_sync="none", **kw)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    assert state["sampler"]["step_in_epoch"] == k
    resumed = BalancedDataLoader(ds, balancer=make_balancer(2), rank=0, world_size=2, plan_sync="none", **kw)
    resumed.load_state_dict(state)
    assert [sequences(b) for b in resumed] == reference[k:]
    again = [sequences(b) for b in it]  # the abandoned iterator is untouched by the state copy
    assert again == reference[k:]


def test_iterating_again_after_break_continues() -> None:
    ds = hf_dataset(40, seed=8)
    loader = BalancedDataLoader(ds, balancer=make_balancer(1), sequences_per_step=5)
    reference = [sequences(b) for b in BalancedDataLoader(ds, balancer=make_balancer(1), sequences_per_step=5)]
    for i, b in enumerate(loader):
        if i == 2:
            break
    rest = [sequences(b) for b in loader]
    assert rest == reference[3:]
    assert next(iter(loader)).epoch == 1


def test_loader_state_validation() -> None:
    ds = hf_dataset(10)
    loader = BalancedDataLoader(ds, balancer=make_balancer(1), sequences_per_step=5)
    with pytest.raises(ValueError, match="version"):
        loader.load_state_dict({"version": 3})
    with pytest.raises(ValueError, match="no 'sampler' entry"):
        loader.load_state_dict({"version": 1, "stream": {}})


# -- streaming ------------------------------------------------------------------------------------
class TorchStream(tud.IterableDataset):  # type: ignore[type-arg]
    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for r in self.rows:
            yield {"input_ids": r}


@pytest.mark.parametrize("kind", ["torch", "hf"])
def test_streaming_matches_map_style_in_arrival_order(kind: str) -> None:
    rows = token_rows(50, seed=11)
    ds = datasets.Dataset.from_dict({"input_ids": rows})
    stream = TorchStream(rows) if kind == "torch" else ds.to_iterable_dataset()
    kw = dict(tokens_per_step=450, shuffle=False)
    mapped = [sorted(sequences(b)) for b in BalancedDataLoader(ds, balancer=make_balancer(1), **kw)]
    streamed = BalancedDataLoader(stream, balancer=make_balancer(1), **kw)
    assert streamed.streaming
    got = [sorted(sequences(b)) for b in streamed]
    assert got == mapped


@pytest.mark.parametrize("k", [0, 1, 4])
def test_streaming_resume(k: int) -> None:
    rows = token_rows(60, seed=12)
    kw = dict(tokens_per_step=400, plan_ahead=2)
    reference = [sequences(b) for b in BalancedDataLoader(TorchStream(rows), balancer=make_balancer(2), rank=1, world_size=2, plan_sync="none", **kw)]
    first = BalancedDataLoader(TorchStream(rows), balancer=make_balancer(2), rank=1, world_size=2, plan_sync="none", **kw)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    it.close()
    resumed = BalancedDataLoader(TorchStream(rows), balancer=make_balancer(2), rank=1, world_size=2, plan_sync="none", **kw)
    resumed.load_state_dict(state)
    assert [sequences(b) for b in resumed] == reference[k:]


def test_streaming_timings_grow_with_steps_and_are_not_state() -> None:
    rows = token_rows(60, seed=13)
    kw = dict(tokens_per_step=400, plan_ahead=1)
    loader = BalancedDataLoader(TorchStream(rows), balancer=make_balancer(1), **kw)
    seen = [dataclasses.replace(loader.stats)]
    for _ in range(2):  # two epochs, a snapshot after every step
        seen += [dataclasses.replace(loader.stats) for _ in loader]
    seen.append(dataclasses.replace(loader.stats))
    fields = ("read_seconds", "exchange_seconds", "collective_seconds", "plan_seconds")
    for before, after in zip(seen, seen[1:]):
        assert all(0 <= getattr(before, k) <= getattr(after, k) for k in fields)
    epoch = (len(seen) - 2) // 2
    assert 0 < seen[epoch + 1].read_seconds < seen[-1].read_seconds  # the second epoch read the stream again
    assert 0 < seen[epoch + 1].plan_seconds < seen[-1].plan_seconds
    assert seen[-1].exchange_seconds == seen[-1].collective_seconds == 0  # one rank: nothing exchanged
    state = loader.state_dict()
    assert not set(_keys(state)) & {f.name for f in dataclasses.fields(SamplerStats)}
    resumed = BalancedDataLoader(TorchStream(rows), balancer=make_balancer(1), **kw)
    resumed.load_state_dict(state)
    assert resumed.stats == SamplerStats()  # not restored: each process counts its own work


def _keys(d: Any) -> Iterator[str]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield k
            yield from _keys(v)
    elif isinstance(d, list):
        for v in d:
            yield from _keys(v)


def test_streaming_over_long_policies() -> None:
    rows = [[1] * 10, [2] * 300, [3] * 20]
    with pytest.raises(ValueError, match="stream sample 1 has 300 tokens"):
        list(BalancedDataLoader(TorchStream(rows), balancer=make_balancer(1), sequences_per_step=3))
    loader = BalancedDataLoader(TorchStream(rows), balancer=make_balancer(1), sequences_per_step=3, overlong="drop")
    assert sorted(sid for b in loader for sid, _ in sequences(b)) == [0, 2]
    assert loader.stats.dropped_overlong == 1 and loader.stats.dropped_overlong_ids == [1]
    split = BalancedDataLoader(TorchStream(rows), balancer=make_balancer(1), sequences_per_step=3, overlong="split")
    (batch,) = list(split)
    assert batch.global_loss_tokens == 9 + 299 + 19
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(BalancedDataLoader(TorchStream([[1] * 3]), balancer=make_balancer(1), sequences_per_step=1))) == 1
