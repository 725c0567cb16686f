"""A plain PyTorch training loop: wrap the DataLoader you already have with BalancedDataLoader.wrap.

    python examples/plain_pytorch_loop.py --steps 4                       # one process
    torchrun --nproc_per_node 2 examples/plain_pytorch_loop.py --steps 4  # DDP on 2 processes

What changes in your loop (see docs/integrations/pytorch.md):

1. build a :class:`Balancer` (cluster, candidate strategies, cost model) once;
2. ``loader = BalancedDataLoader.wrap(old_loader, balancer=..., tokens_per_step=...)`` —
   the dataset, workers and pinning stay; the batch size and sampler become the plan;
3. iterate one ``StepBatch`` per optimizer step and run its micro-batches (packed rows)
   with ``batch.sync_context(model, k)`` (DDP ``no_sync`` on all but the last);
4. ``packed_loss(logits, mb, grad_divisor=world)``: every micro-batch's loss is divided by
   the step's global loss-token count, so the gradient is exactly the global token mean.

The model here is a small decoder written in plain torch that attends within each packed
sequence (one causal attention call per ``cu_seqlens`` segment; a varlen kernel such as
flash-attn's does the same in one call). Sequence lengths are real (a bundled length
file, capped); the tokens are synthetic.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from balancer.cost import CostModel
from balancer.data import bundled_names, read_lengths
from balancer.selector import Balancer
from balancer.specs import ModelSpec
from dataloader import BalancedDataLoader, PackedCollator, packed_loss
from strategies import ClusterSpec, Layout, Strategy


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="sft_gsm8k_train", help=f"bundled length file ({', '.join(bundled_names())})")
    p.add_argument("--max-length", type=int, default=512, help="cap on sequence length, tokens")
    p.add_argument("--num-samples", type=int, default=2000, help="dataset size (first N lengths)")
    p.add_argument("--tokens-per-step", type=int, default=8192, help="tokens per optimizer step, all ranks together")
    p.add_argument("--micro-batch-tokens", type=int, default=2048, help="most tokens in one packed micro-batch")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


# -- what you already have: a dataset, a model, a DataLoader --------------------------------------


class CountingDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Sample ``i``: ``lengths[i]`` tokens counting up from a random start (mod vocab) — learnable."""

    def __init__(self, lengths: np.ndarray, vocab: int, seed: int) -> None:
        self.lengths, self.vocab, self.seed = lengths, vocab, seed

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = np.random.default_rng((self.seed, i)).integers(self.vocab)
        return {"input_ids": (start + torch.arange(int(self.lengths[i]))) % self.vocab}


def pad_collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The padding collate a loop typically starts from (replaced by packing below)."""
    return {"input_ids": nn.utils.rnn.pad_sequence([s["input_ids"] for s in samples], batch_first=True)}


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Causal attention inside each sequence of a packed row; q, k, v: (1, nh, T, hs)."""
    cu = cu_seqlens.tolist()
    if len(cu) < 2:  # an idle rank's empty micro-batch: T = 0, still part of the graph
        return q * 0.0
    parts = [F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True)
             for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat(parts, dim=2)  # (1, nh, T, hs)


class TinyDecoder(nn.Module):
    """Pre-norm decoder; attention never crosses a packed sequence boundary."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(4096, hidden)  # learned positions; position_ids restart per sequence
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"norm1": nn.LayerNorm(hidden), "qkv": nn.Linear(hidden, 3 * hidden),
                           "out": nn.Linear(hidden, hidden), "norm2": nn.LayerNorm(hidden),
                           "mlp": nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))})
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        x = self.embed(input_ids) + self.pos(position_ids)  # (B, T, h)
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](x)).view(B, T, 3, self.heads, -1).unbind(2)  # (B, T, nh, hs) each
            y = packed_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cu_seqlens)  # (B, nh, T, hs)
            x = x + blk["out"](y.transpose(1, 2).reshape(B, T, -1))
            x = x + blk["mlp"](blk["norm2"](x))
        return self.head(self.norm(x))  # (B, T, vocab)


def main() -> None:
    args = parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")  # CPU; on GPUs use "nccl" and move the model and each mb to the device
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)

    lengths = np.minimum(read_lengths(args.lengths)[: args.num_samples], args.max_length)
    dataset = CountingDataset(lengths, args.vocab, args.seed)
    old_loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=pad_collate,
                                             num_workers=args.num_workers)
    model: nn.Module = TinyDecoder(args.vocab, args.hidden, args.layers, args.heads)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # -- the hydraulis part -----------------------------------------------------------------------
    # DDP replicas hold the whole model, so the only candidate is data parallelism (tp1 on every
    # rank); the balancer still decides which rank gets which sequences and how they are packed.
    # Cost: the analytic a·s² + b·s of this model's shape; capacity: --micro-batch-tokens.
    spec = ModelSpec(name="tiny-decoder", num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                     ffn_hidden_size=4 * args.hidden, vocab_size=args.vocab, gated_mlp=False, dtype_bytes=4)
    tp1 = CostModel.analytic(spec, "cpu").cost(Layout(1))
    cost = CostModel.from_coefficients({Layout(1): (tp1.a, tp1.b, tp1.c, args.micro_batch_tokens, tp1.d)})
    cluster = ClusterSpec(num_ranks=world, ranks_per_node=world)
    balancer = Balancer(cluster, [Strategy.homogeneous(Layout(1), world)], cost)
    loader = BalancedDataLoader.wrap(old_loader, balancer=balancer, lengths=lengths, collate_fn=PackedCollator(),
                                     tokens_per_step=args.tokens_per_step, max_length=args.max_length,
                                     seed=args.seed)
    if rank == 0:
        print(f"{world} rank(s); {len(dataset):,} samples of {args.lengths} capped at {args.max_length} tokens; "
              f"{args.tokens_per_step:,} tokens per step; micro-batch capacity {cost.token_capacity(Layout(1)):,} "
              f"tokens; {len(loader)} steps per epoch")

    for step, batch in enumerate(loader):  # one StepBatch per optimizer step
        if step == args.steps:
            break
        t0 = time.perf_counter()
        loss_sum = torch.zeros(())
        for k, mb in enumerate(batch.micro_batches):  # this rank's packed rows
            with batch.sync_context(model, k):  # DDP: all-reduce only after the last micro-batch
                logits = model(mb["input_ids"], mb["position_ids"], mb["cu_seqlens"])
                loss = packed_loss(logits, mb, grad_divisor=world)  # exact global token mean
                loss.backward()
            loss_sum += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if distributed:
            dist.all_reduce(loss_sum)
        mine = sum(int(mb["input_ids"].shape[1]) for mb in batch.micro_batches)
        if rank == 0:
            print(f"step {batch.step:>3}  loss {loss_sum.item() / world:.4f}  "
                  f"{batch.plan.global_sequences:>3} sequences / {batch.plan.global_tokens:,} tokens  "
                  f"rank 0: {batch.num_micro_batches} micro-batches, {mine:,} tokens  {time.perf_counter() - t0:.2f} s",
                  flush=True)
    loader.close()
    if distributed:
        dist.barrier()  # all ranks done before teardown (gloo can abort a rank whose peer tears down first)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
