"""Train the reference GPT with per-step balanced plans and heterogeneous strategies.

    torchrun --nproc_per_node 4 examples/train_gpt_balanced.py --steps 8

Runs unchanged on CPU (gloo) and on GPUs (NCCL + bf16 autocast): the device is chosen in
one place, :func:`strategies.runtime.init_distributed`, the attention kernel in another,
:func:`strategies.runtime.choose_kernel` (``--attention``). Tokens are synthetic; the
sequence lengths come from a bundled real length file (capped at ``--max-length``). One step:

    BalancedDataLoader ── sampler → Balancer.plan (rank 0, broadcast) → PackedCollator
        → Engine.step(plan, batch)      gather the plan's compute weights, forward/backward,
                                        reduce-scatter gradients to the owners, AdamW on the chunks
        → Balancer.observe(per-rank measured seconds)       stragglers get less work

Every rank holds 1/world of the fp32 master parameters, gradients and AdamW state (the
sharded state, :mod:`strategies.runtime.state`) plus, during a step, its layout's compute
shard; the start-up line prints the bytes. ``--save DIR`` writes a checkpoint at the end
(``torch.distributed.checkpoint``, loadable at any world size with ``--load DIR``).

The cost model: every rank times the reference GPT's forward + backward at a few lengths
on its device at the same time (so the timing sees the same contention as training), and
the mean is fitted to ``a·s² + b·s + c`` for ``tp1`` (:meth:`CostModel.fit`); other layouts
are derived from it — tp divides all the work at ``--scaling-efficiency`` per doubling, cp
divides attention fully but its per-token work at that efficiency squared (the K/V
all-gather), capacity grows with ``tp·cp``; a pipeline stage does ``1/pp`` of the work
per micro-batch the busiest stage's share of the work (the runtime's stage split, the LM
head and the loss on the last stage) and holds as many tokens as the replica without pipelining (1F1B keeps up to
``pp`` micro-batches of ``1/pp`` of the layers in flight) — a rough model for a demo. Pass
``--cost-model FILE`` (``CostModel.save`` JSON) for a measured one. Candidates come from
:func:`balancer.pool.generate_candidates`, pipeline layouts included (``--no-pp`` leaves
them out); the runtime runs them with 1F1B.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from balancer.cost import CostModel, LayoutCost
from balancer.data import bundled_names, read_lengths
from balancer.pool import generate_candidates
from balancer.selector import Balancer, BalancerConfig
from dataloader import BalancedDataLoader
from strategies import ClusterSpec, Layout
from strategies.runtime import (
    GPT,
    SINGLE_DEVICE,
    Engine,
    EngineConfig,
    ModelConfig,
    check_micro_batch,
    head_blocks,
    init_distributed,
    prepare_micro_batch,
    split_layers,
)
from strategies.stages import stage_costs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="sft_alpaca_eval_outputs",
                   help=f"bundled name ({', '.join(bundled_names())}) or a Parquet file")
    p.add_argument("--max-length", type=int, default=1024, help="cap every sequence at this many tokens")
    p.add_argument("--tokens-per-step", type=int, default=8192, help="global batch budget in tokens")
    p.add_argument("--micro-batch-tokens", type=int, default=512, help="token capacity of one tp1 micro-batch")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--num-candidates", type=int, default=4)
    p.add_argument("--no-pp", action="store_true", help="candidates without pipeline layouts (default: with)")
    p.add_argument("--max-pp", type=int, default=4, help="largest pipeline degree of a candidate layout")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scaling-efficiency", type=float, default=0.85,
                   help="derived cost model: fraction of ideal speed-up kept per doubling of tp·cp")
    p.add_argument("--cost-model", default=None, help="JSON from CostModel.save instead of the start-up fit")
    p.add_argument("--attention", default="auto", help="attention kernel: auto, flash_attn, varlen or sdpa")
    p.add_argument("--load", default=None, help="checkpoint directory to start from (any world size)")
    p.add_argument("--save", default=None, help="checkpoint directory to write after the last step")
    return p.parse_args()


class SyntheticTokens(torch.utils.data.Dataset):
    """Sample ``i`` = ``lengths[i]`` tokens ``(start + stride·t) mod vocab`` with a per-sample start and
    stride: learnable in context, so the loss visibly falls; the same on every rank and every epoch."""

    def __init__(self, lengths: np.ndarray, vocab: int, seed: int) -> None:
        self.lengths, self.vocab, self.seed = lengths, vocab, seed

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, int(i)))
        start, stride = rng.integers(0, self.vocab), rng.integers(1, 8)
        return {"input_ids": (start + stride * np.arange(int(self.lengths[i]), dtype=np.int64)) % self.vocab}


def time_tp1(cfg: ModelConfig, device: torch.device, lengths: list[int], dtype: torch.dtype | None,
             attention: str, repeats: int = 3) -> list[float]:
    """Forward + backward seconds of the reference GPT on one sequence of each length (min of repeats).

    The weights are in the compute dtype, as the engine's compute weights are.
    """
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg).to(dtype or torch.float32)
    model.attention_kernel = attention
    out = []
    for s in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, s))
        labels = ids.clone()
        labels[0, 0] = -100
        mb = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(s)[None],
              "cu_seqlens": torch.tensor([0, s], dtype=torch.int32)}
        batch = prepare_micro_batch(check_micro_batch(mb, 0, cfg.vocab_size), SINGLE_DEVICE, device)
        best = math.inf
        for k in range(repeats + 1):  # the first run warms up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = model(batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if k:
                best = min(best, time.perf_counter() - t0)
        out.append(best)
    return out


def _busiest_stage_share(cfg: ModelConfig, layout: Layout) -> float:
    """The slowest pipeline stage's share of one micro-batch's work (1.0 without pipelining).

    Work in units of one transformer block (:func:`strategies.stages.stage_costs` of the
    runtime's own split, LM head and loss on the last stage), so a pp layout is priced by the
    stage that sets the 1F1B pace, not by ``1/pp`` of the model.
    """
    if layout.pp == 1:
        return 1.0
    head = head_blocks(cfg, layout.tp)
    costs = stage_costs(split_layers(cfg, layout), last_extra=head)
    return max(costs) / (cfg.num_layers + head)


def build_cost_model(args: argparse.Namespace, cfg: ModelConfig, device: torch.device,
                     dtype: torch.dtype | None) -> CostModel:
    """Every rank times tp1 at once (as loaded as in training); the mean is fitted; other layouts scale."""
    if args.cost_model:
        return CostModel.load(args.cost_model)
    lengths = sorted({max(8, args.max_length * k // 8) for k in (1, 2, 4, 6, 8)})
    seconds = torch.tensor(time_tp1(cfg, device, lengths, dtype, args.attention), dtype=torch.float64, device=device)
    dist.all_reduce(seconds)  # the same numbers on every rank → the same fit → the same plans
    fit = CostModel.fit(lengths, (seconds / dist.get_world_size()).tolist(), token_capacity=args.micro_batch_tokens)
    base = fit.cost(Layout(1))

    e = args.scaling_efficiency

    def derive(layout: Layout) -> LayoutCost:
        cfg.check_tp(layout.tp)  # ValueError: the model cannot be split this way → not a candidate
        split_layers(cfg, layout)  # ValueError: more stages than blocks
        tp_gain = layout.tp * e ** math.log2(layout.tp)  # tp splits all the work, pays all-reduces
        cp_attn = layout.cp  # the head+tail split keeps attention balanced
        cp_lin = layout.cp * e ** (2 * math.log2(layout.cp))  # ... but the K/V all-gather costs per token
        # one stage per micro-batch: the busiest stage's share of the model's work (blocks + LM head)
        share = _busiest_stage_share(cfg, layout)
        return LayoutCost(a=base.a * share / (tp_gain * cp_attn), b=base.b * share / (tp_gain * cp_lin), c=base.c,
                          d=base.d * share, token_capacity=base.token_capacity * layout.tp * layout.cp)

    return CostModel({Layout(1): base}, source="fit+scaled", resolver=derive)


def main() -> None:
    args = parse_args()
    device = init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, ffn_hidden_size=args.ffn)
    lengths = np.minimum(read_lengths(args.lengths), args.max_length)
    cluster = ClusterSpec(num_ranks=world, ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    autocast = torch.bfloat16 if device.type == "cuda" else None  # fp32 on CPU
    cost = build_cost_model(args, cfg, device, autocast)
    pool = generate_candidates(lengths, cluster, cost, batch_tokens=args.tokens_per_step,
                               num_candidates=args.num_candidates, max_length=args.max_length,
                               allow_pp=not args.no_pp, max_pp=args.max_pp)
    candidates = list(pool.strategies)
    balancer = Balancer(cluster, candidates, cost, BalancerConfig(seed=args.seed))
    engine = Engine(
        candidates, cfg, lambda m: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.1),
        config=EngineConfig(token_capacity=cost.token_capacity, autocast_dtype=autocast, attention=args.attention,
                            seed=args.seed),
        device=device,
    )
    if args.load:
        engine.load_checkpoint(args.load)
    loader = BalancedDataLoader(SyntheticTokens(lengths, args.vocab, args.seed), balancer=balancer,
                                lengths=lengths, tokens_per_step=args.tokens_per_step, seed=args.seed)
    if rank == 0:
        state = engine.state.nbytes()
        print(f"{world} ranks on {device.type}; {len(lengths):,} sequences of {args.lengths} capped at "
              f"{args.max_length} tokens; model {engine.num_parameters:,} parameters; "
              f"{args.tokens_per_step:,} tokens per step; attention kernel {engine.attention_kernel}")
        print(f"rank 0 holds {state['master'] / 2**20:,.1f} MiB of fp32 master chunks "
              f"({engine.num_parameters * 4 / 2**20:,.1f} MiB for the whole model) and as much for gradients")
        print("layouts: " + ", ".join(pool.meta["layouts"]) + f" ({pool.meta['num_generated']} strategies scored)")
        print("candidates: " + ", ".join(s.name for s in candidates))
        print(f"{'step':>4}  {'strategy':<24} {'est s':>8} {'measured s':>10} {'step s':>8} {'loss':>7}")
    result = None
    for k, batch in enumerate(loader):
        if k == args.steps:
            break
        result = engine.step(batch.plan, batch)
        balancer.observe(result.rank_seconds, batch.plan)
        if rank == 0:
            print(f"{batch.step:>4}  {batch.plan.strategy:<24} {batch.plan.est_step_seconds:>8.4f} "
                  f"{max(result.rank_seconds):>10.4f} {result.step_seconds:>8.4f} {result.loss:>7.4f}", flush=True)
    loader.close()
    if rank == 0 and result is not None:
        held = result.resident_bytes
        print("rank 0 held during the last step (MiB): "
              + ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in held.items()))
    if args.save:
        engine.save_checkpoint(args.save)
    dist.barrier()  # all ranks done before teardown (gloo can abort a rank whose peer tears down first)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
