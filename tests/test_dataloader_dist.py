"""Real processes (gloo): every rank derives the same plan; the loss normalisation gives the
single-process gradient of the same global batch.

Processes are forked (the parent already imported torch, numba and the balancer, so
start-up costs no re-import); each test joins them under a timeout and kills leftovers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from balancer.cost import CostModel
from balancer.selector import Balancer
from dataloader import BalancedDataLoader
from dataloader.loss import packed_loss, token_loss_sum
from strategies.layout import ClusterSpec, Layout, Strategy
from strategies.plan import StepPlan

VOCAB = 61
TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(fn: Callable[..., Any], rank: int, world: int, port: int, out: Any, args: tuple[Any, ...], timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        out.put((rank, "ok", fn(rank, world, *args)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` forked gloo ranks whose job timeout is ``timeout_s``; the results by rank."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, out, args, timeout_s), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = out.get(timeout=TIMEOUT)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    except queue.Empty:
        raise AssertionError(f"ranks {sorted(set(range(world)) - set(results))} did not finish within {TIMEOUT} s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def rows(n: int, seed: int = 0, high: int = 120) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=int(k)).tolist() for k in rng.integers(2, high, size=n)]


def make_balancer(world: int, hetero: bool) -> Balancer:
    cost = CostModel.from_coefficients({"tp1": (1e-6, 1e-4, 1e-3, 128), "tp2": (0.6e-6, 0.6e-4, 1e-3, 256)})
    cands = [Strategy.homogeneous(Layout(tp=1), world)]
    if hetero:
        cands.append(Strategy.from_counts([(Layout(tp=2), 1), (Layout(tp=1), world - 2)]))
    return Balancer(ClusterSpec(num_ranks=world), cands, cost)


# -- every rank, the same plan ---------------------------------------------------------------------
def _agree(rank: int, world: int, sync: str) -> list[dict[str, Any]]:
    data = [{"input_ids": r} for r in rows(90, seed=1, high=200)]
    loader = BalancedDataLoader(data, balancer=make_balancer(world, hetero=True), lengths=[len(d["input_ids"]) for d in data], tokens_per_step=900, plan_sync=sync)
    mine: list[dict[str, Any]] = []

    def record(batch: Any) -> None:
        got = [mb["sample_ids"].tolist() for mb in batch.micro_batches]
        assert got == [list(sp.sample_ids) for sp in batch.specs]  # the collated rows are the planned ones
        mine.append({"plan": batch.plan.canonical_json(), "replica": batch.rank_plan.replica_index, "micro_batches": got})

    for i, batch in enumerate(loader):  # break off and continue: the stop protocol must not hang
        record(batch)
        if i == 1:
            break
    for batch in loader:
        record(batch)
    return mine


@pytest.mark.parametrize("sync", ["verify", "broadcast", "none"])
def test_every_rank_derives_the_same_plan(sync: str) -> None:
    world = 3
    got = run_ranks(_agree, world, sync)
    steps = len(got[0])
    assert all(len(g) == steps for g in got), "every rank runs the same number of steps"
    seen: list[int] = []
    shared_replicas = 0
    for t in range(steps):
        texts = {g[t]["plan"] for g in got}
        assert len(texts) == 1, f"step {t}: ranks hold different plans"
        plan = StepPlan.from_json(texts.pop())
        by_replica: dict[int, list[int]] = {}
        for r in range(world):  # every rank, tensor-parallel peers included, runs its own part of the plan
            rank_plan = plan.for_rank(r)
            assert got[r][t]["replica"] == rank_plan.replica_index
            assert got[r][t]["micro_batches"] == [list(mb) for mb in rank_plan.micro_batches], f"step {t}, rank {r}"
            by_replica.setdefault(rank_plan.replica_index, []).append(r)
        for members in by_replica.values():
            assert all(got[r][t]["micro_batches"] == got[members[0]][t]["micro_batches"] for r in members)
            shared_replicas += len(members) > 1
        seen += plan.sample_ids()
    assert shared_replicas > 0, "the test needs steps whose plan has a replica of several (tensor-parallel) ranks"
    assert sorted(seen) == list(range(90))


def _root_stops_right_after_a_broadcast(rank: int, world: int) -> int:
    import time

    real_broadcast = dist.broadcast_object_list

    def broadcast(objs: list[Any], *args: Any, **kwargs: Any) -> None:
        if rank == 0 and objs[0][:2] == ("ok", 4):  # (outcome, step, batch fingerprint, plan JSON)
            time.sleep(1.0)  # both training loops break (at step 3) while step 4's plan is on its way
        real_broadcast(objs, *args, **kwargs)

    dist.broadcast_object_list = broadcast  # this forked child's copy only
    data = [{"input_ids": r} for r in rows(90, seed=4, high=120)]
    loader = BalancedDataLoader(data, balancer=make_balancer(world, hetero=False),
                                lengths=[len(d["input_ids"]) for d in data], tokens_per_step=500, plan_sync="broadcast")
    for batch in loader:
        if batch.step == 3:
            break
        dist.all_reduce(torch.ones(1))  # the training step's gradient sync
    loader.close()  # must not hang
    x = torch.ones(1)
    dist.all_reduce(x)  # and the process group still works
    return int(x.item())


def test_root_stopping_right_after_broadcasting_a_plan_does_not_hang() -> None:
    """Both ranks stop while rank 0's broadcast of the next plan is on its way: nobody may hang.

    (Before the plan rounds ended in an outcome all-gather, rank 0 then drained its own
    broadcasts and rank 1 waited forever.)"""
    assert run_ranks(_root_stops_right_after_a_broadcast, 2) == [2, 2]


def _disagree(rank: int, world: int) -> str:
    data = [{"input_ids": r} for r in rows(40, seed=2)]
    # Rank 1 plans with other costs: its plans differ, and verification must say so on every rank.
    slow = 3.0 if rank == 1 else 1.0
    cost = CostModel.from_coefficients({"tp1": (1e-6 * slow, 1e-4, 1e-3, 128), "tp2": (0.6e-6, 0.6e-4 * slow, 1e-3, 256)})
    cands = [Strategy.homogeneous(Layout(tp=1), world), Strategy.homogeneous(Layout(tp=2), world)]
    bal = Balancer(ClusterSpec(num_ranks=world), cands, cost)
    loader = BalancedDataLoader(data, balancer=bal, lengths=[len(d["input_ids"]) for d in data], sequences_per_step=40, plan_sync="verify")
    try:
        list(loader)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return str(e)
    return "no error"


def test_verification_names_the_disagreeing_ranks() -> None:
    got = run_ranks(_disagree, 2)
    for msg in got:
        assert "ranks derived different plans for step 0" in msg


# -- gradients: balanced + normalised == single process ---------------------------------------------
class TinyLM(nn.Module):
    """Token + position embeddings and a per-token MLP: depends on position_ids, not on packing."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 16)
        self.pos = nn.Embedding(256, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, VOCAB))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.tok(input_ids) + self.pos(position_ids))


def reference_grads(data: list[list[int]], sample_ids: list[int]) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    model = TinyLM()
    total = torch.zeros(())
    tokens = 0
    for sid in sample_ids:
        ids = torch.tensor([data[sid]])
        logits = model(ids, torch.arange(ids.shape[1])[None])
        total = total + token_loss_sum(logits, ids)
        tokens += ids.shape[1] - 1
    (total / tokens).backward()
    return {k: p.grad.numpy().copy() for k, p in model.named_parameters()}


def _train_step(rank: int, world: int, ddp: bool) -> dict[str, Any]:
    data = rows(48, seed=3)
    torch.manual_seed(0)
    model: nn.Module = TinyLM()
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
    loader = BalancedDataLoader(
        [{"input_ids": r} for r in data], balancer=make_balancer(world, hetero=False),
        lengths=[len(r) for r in data], sequences_per_step=24, plan_sync="verify",
    )
    batch = next(iter(loader))
    loader.close()  # the epoch is left unfinished: stop planning before the process group goes
    for k, mb in enumerate(batch.micro_batches):
        with batch.sync_context(model, k):
            logits = model(mb["input_ids"], mb["position_ids"])
            loss = packed_loss(logits, mb, grad_divisor=world if ddp else 1)
            loss.backward()
    params = dict(model.module.named_parameters() if ddp else model.named_parameters())
    if not ddp:
        for p in params.values():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
    return {
        "grads": {k: p.grad.numpy().copy() for k, p in params.items()},
        "global_batch": batch.plan.sample_ids(),
        "micro_batches": batch.num_micro_batches,
    }


@pytest.mark.parametrize(("world", "ddp"), [(3, False), (2, True)])
def test_all_reduced_gradient_equals_the_single_process_reference(world: int, ddp: bool) -> None:
    got = run_ranks(_train_step, world, ddp)
    want = reference_grads(rows(48, seed=3), got[0]["global_batch"])
    for g in got:
        assert sorted(g["global_batch"]) == sorted(got[0]["global_batch"])
        for name, ref in want.items():
            np.testing.assert_allclose(g["grads"][name], ref, rtol=1e-4, atol=1e-6, err_msg=name)
