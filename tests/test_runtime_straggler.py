"""Engine + Balancer on 4 gloo processes: a straggler's share shrinks and the step gets faster.

Every rank sleeps ``SECONDS_PER_TOKEN`` per token it runs (rank 3: four times as long),
so the measured compute seconds follow the cost model except for the straggler. Each
rank runs its own deterministic Balancer and feeds it ``engine.step``'s all-gathered
per-rank seconds, so all ranks keep planning the same steps (the engine checks the plan
digests every step).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from balancer.cost import CostModel, LayoutCost
from balancer.selector import Balancer, BalancerConfig
from strategies import ClusterSpec, Layout, Strategy
from strategies.runtime import GPT, SINGLE_DEVICE, Engine, LocalBatch, ModelConfig, ParallelContext, run_local

WORLD = 4
SLOW_RANK = 3
SLOWDOWN = 4.0
SECONDS_PER_TOKEN = 1e-3
STEPS = 8
MODEL = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128)


class SleepyGPT(GPT):
    """The reference GPT plus a sleep proportional to the tokens of each micro-batch."""

    def __init__(self, config: ModelConfig, seconds_per_token: float) -> None:
        super().__init__(config)
        self.seconds_per_token = seconds_per_token

    def forward(self, batch: LocalBatch, pc: ParallelContext = SINGLE_DEVICE) -> torch.Tensor:
        time.sleep(self.seconds_per_token * batch.num_tokens)
        return super().forward(batch, pc)


def _pack(seqs: list[np.ndarray], ids: list[int], glt: int) -> dict:
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lens)])
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    labels = flat.copy()
    labels[cu[:-1]] = -100
    pos = np.arange(flat.size) - np.repeat(cu[:-1], lens)
    return dict(input_ids=torch.from_numpy(flat)[None], labels=torch.from_numpy(labels)[None],
                position_ids=torch.from_numpy(pos)[None], cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
                sample_ids=torch.tensor(ids, dtype=torch.int64), global_loss_tokens=glt)


def _worker(rank: int, world: int) -> list[dict]:
    candidates = [Strategy.homogeneous(Layout(1), world)]
    cost = CostModel.from_coefficients({Layout(1): LayoutCost(a=0.0, b=SECONDS_PER_TOKEN, c=0.0, token_capacity=4096)})
    balancer = Balancer(ClusterSpec(num_ranks=world, ranks_per_node=world), candidates, cost,
                        BalancerConfig(speed_ewma=0.6))
    slow = SLOWDOWN if rank == SLOW_RANK else 1.0

    def build() -> GPT:
        torch.manual_seed(0)
        return SleepyGPT(MODEL, SECONDS_PER_TOKEN * slow)

    engine = Engine(candidates, build, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
    log = []
    for step in range(STEPS):
        rng = np.random.default_rng(step)
        lengths = rng.integers(8, 48, size=32)
        seqs = [rng.integers(0, MODEL.vocab_size, size=int(s)) for s in lengths]
        plan = balancer.plan(lengths, step=step)
        glt = plan.global_loss_tokens
        mbs = [_pack([seqs[i] for i in mb], list(mb), glt) for mb in plan.for_rank(rank).micro_batches]
        result = engine.step(plan, mbs)
        balancer.observe(result.rank_seconds, plan)
        slow_tokens = sum(int(lengths[i]) for i in plan.for_rank(SLOW_RANK).sample_ids)
        log.append({"share": slow_tokens / int(lengths.sum()), "seconds": max(result.rank_seconds),
                    "speed": balancer.rank_speed.tolist(), "digest": plan.digest})
    return log


def test_straggler_share_shrinks_and_step_time_drops():
    logs = run_local(_worker, WORLD, timeout_s=150, collective_timeout_s=30)
    for log in logs[1:]:
        assert [e["digest"] for e in log] == [e["digest"] for e in logs[0]]  # one plan per step everywhere
    log = logs[0]
    share = [e["share"] for e in log]
    seconds = [e["seconds"] for e in log]
    # step 0 knows nothing: an even split (1/4 of the tokens); at speed 1/4 the ideal share is 1/13
    assert 0.2 < share[0] < 0.3
    assert max(share[-2:]) < 0.15, share
    assert log[-1]["speed"][SLOW_RANK] < 0.5 * min(log[-1]["speed"][r] for r in range(WORLD) if r != SLOW_RANK)
    # the straggler dominated step 0 (4 × a quarter of the tokens); balanced, the step is far shorter
    assert max(seconds[-2:]) < 0.7 * seconds[0], seconds
