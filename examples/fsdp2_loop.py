"""A Hugging Face model sharded with PyTorch FSDP2 (``fully_shard``), fed by the balanced loader.

    torchrun --nproc_per_node 2 examples/fsdp2_loop.py --steps 4
    torchrun --nproc_per_node 2 examples/fsdp2_loop.py --steps 4 --check   # and the unbalanced reference
    torchrun --nproc_per_node 2 examples/fsdp2_loop.py --steps 4 --reshard # FSDP2's memory: lockstep micro-batches

The homogeneous case most users with their own trainer have: every rank holds a shard of
the same model, so the only candidate strategy is data parallelism (``tp1`` on every
rank); the balancer decides which rank gets which sequences and how they are packed, by
estimated time. What the loop does (see docs/integrations/fsdp2.md):

* ``fully_shard`` every decoder layer, then the model;
* ``batch.sync_context(model, k)`` around each micro-batch: ranks run different numbers
  of micro-batches, so FSDP2 accumulates unsharded gradients until the last one and
  reduce-scatters once — every rank issues the same collectives whatever its count;
  parameters and gradients stay unsharded through the step (DDP-like memory);
* ``--reshard``: ``for k, mb in batch.lockstep_micro_batches()`` with
  ``batch.sync_context(model, k, mode="reshard")`` — every rank runs the step's largest
  micro-batch count (one-token zero-loss pads fill in), longest first, and FSDP2 reshards
  parameters and reduce-scatters gradients after every micro-batch (FSDP2's own memory);
* ``model(**hf_packed_inputs(mb, model))``: the packed row's sequences stay apart;
* ``packed_loss(logits, mb, grad_divisor=world)``: FSDP2 averages gradients over the
  ranks, and the loss is divided by the step's global loss-token count — the gradient is
  exactly the global token mean, the same as one process on the whole global batch.

Each step logs the most bytes of parameters and gradients any rank held unsharded between
two micro-batches (``held_bytes``): the whole model's in the default mode when a rank runs
two or more, 0 with ``--reshard``.

``--check`` trains an unsharded copy on rank 0 the plain way — each global batch's
sequences one by one, token-mean loss, the same optimizer — and prints the largest
difference between its losses and the FSDP2 run's. A tiny randomly initialised
``LlamaForCausalLM`` (config only, nothing downloaded); sequence lengths are real (a
bundled length file, capped), the tokens synthetic. CPU/gloo here; on GPUs the same
script runs with NCCL (each rank uses ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from balancer.cost import CostModel
from balancer.data import bundled_names, read_lengths
from balancer.selector import Balancer
from balancer.specs import ModelSpec
from dataloader import BalancedDataLoader, hf_packed_inputs, packed_loss, token_loss_sum
from strategies import ClusterSpec, Layout, Strategy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="sft_gsm8k_train", help=f"bundled length file ({', '.join(bundled_names())})")
    p.add_argument("--max-length", type=int, default=384, help="cap on sequence length, tokens")
    p.add_argument("--num-samples", type=int, default=2000, help="dataset size (first N lengths)")
    p.add_argument("--tokens-per-step", type=int, default=4096, help="tokens per optimizer step, all ranks together")
    p.add_argument("--micro-batch-tokens", type=int, default=1024, help="most tokens in one packed micro-batch")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2 on GPUs)")
    p.add_argument("--check", action="store_true", help="also train the unbalanced reference on rank 0 and compare")
    p.add_argument("--reshard", action="store_true",
                   help="lockstep micro-batches, FSDP2 resharding after each (FSDP2's memory; ranks wait per micro-batch)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# -- what you already have: a dataset and a model ----------------------------------------------------
VOCAB = 128


class CountingDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Sample ``i``: ``lengths[i]`` tokens counting up from a random start (mod the vocabulary) — learnable."""

    def __init__(self, lengths: np.ndarray, seed: int) -> None:
        self.lengths, self.seed = lengths, seed

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = np.random.default_rng((self.seed, i)).integers(VOCAB)
        return {"input_ids": (start + torch.arange(int(self.lengths[i]))) % VOCAB}


def build_dataset(args: argparse.Namespace) -> CountingDataset:
    return CountingDataset(np.minimum(read_lengths(args.lengths)[: args.num_samples], args.max_length), args.seed)


def build_model(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         attn_implementation=args.attn)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)  # random initialisation from the config; nothing is downloaded


# -- the hydraulis part ----------------------------------------------------------------------------
def build_loader(dataset: CountingDataset, model: Any, rank: int, world: int, args: argparse.Namespace) -> BalancedDataLoader:
    """The balanced loader: one tp1 candidate (every rank holds a shard of the whole model)."""
    c = model.config
    spec = ModelSpec(name="tiny-llama", num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                     num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                     ffn_hidden_size=c.intermediate_size, vocab_size=c.vocab_size, dtype_bytes=4)
    tp1 = CostModel.analytic(spec, "cpu").cost(Layout(1))  # a·s² + b·s of this shape; calibrate for real runs
    cost = CostModel.from_coefficients({Layout(1): (tp1.a, tp1.b, tp1.c, args.micro_batch_tokens)})
    balancer = Balancer(ClusterSpec(num_ranks=world, ranks_per_node=world), [Strategy.homogeneous(Layout(1), world)], cost)
    return BalancedDataLoader(dataset, balancer=balancer, lengths=dataset.lengths, max_length=args.max_length,
                              tokens_per_step=args.tokens_per_step, seed=args.seed, rank=rank, world_size=world)


@dataclass
class StepLog:
    step: int
    loss: float
    """Global token-mean loss of the step (all ranks)."""
    sample_ids: list[int]
    """The step's global batch."""
    micro_batches: list[int]
    """Micro-batches per rank in the plan (with --reshard every rank runs the largest)."""
    held_bytes: int
    """The most bytes of parameters and gradients any rank held unsharded between two micro-batches."""
    seconds: float
    reference_loss: float | None = None
    """--check (rank 0): the unbalanced run's loss on the same global batch."""


def shard(model: Any) -> Any:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # the root: embeddings, final norm, LM head
    return model


def unsharded_bytes(model: Any) -> int:
    """Bytes of the parameters FSDP2 holds unsharded now, with their gradients.

    A sharded parameter is registered on its module as a ``DTensor`` shard; an unsharded one
    (all-gathered, not yet resharded) as a plain tensor — the whole parameter on every rank."""
    from torch.distributed.tensor import DTensor

    held = [p for p in model.parameters() if not isinstance(p, DTensor)]
    return sum(p.numel() * p.element_size() + (p.grad.numel() * p.grad.element_size() if p.grad is not None else 0)
               for p in held)


def train(rank: int, world: int, args: argparse.Namespace) -> tuple[list[StepLog], Any]:
    """The FSDP2 loop on this rank (torch.distributed already initialised); the steps' logs and the sharded model."""
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() else torch.device("cpu")
    dataset = build_dataset(args)
    model = build_model(args).to(device)
    reference = copy.deepcopy(model) if args.check and rank == 0 else None
    shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loader = build_loader(dataset, model, rank, world, args)

    logs: list[StepLog] = []
    for batch in loader:  # one StepBatch per optimizer step
        if batch.step == args.steps:
            break
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        held = 0
        if args.reshard:  # every rank: the step's largest count, longest first, zero-loss pads
            steps, mode = batch.lockstep_micro_batches(), "reshard"
        else:  # this rank's own count; FSDP2 reduce-scatters once, after the last
            steps, mode = list(enumerate(batch.micro_batches)), "accumulate"
        for k, mb in steps:
            mb = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in mb.items()}
            with batch.sync_context(model, k, mode=mode):
                logits = model(**hf_packed_inputs(mb, model)).logits
                loss = packed_loss(logits, mb, grad_divisor=world)  # exact global token mean
                loss.backward()
            total += loss.detach()
            if k < len(steps) - 1:  # what stays on the device until the next micro-batch
                held = max(held, unsharded_bytes(model))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(total)  # Σ over ranks = world × the global token mean
        most = torch.tensor(held, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        logs.append(StepLog(batch.step, total.item() / world, batch.plan.sample_ids(),
                            [len(r.micro_batches) for r in batch.plan.replicas], int(most.item()),
                            time.perf_counter() - t0))
    loader.close()
    if reference is not None:
        for log, ref in zip(logs, unbalanced_losses(reference, dataset, [log.sample_ids for log in logs], args)):
            log.reference_loss = ref
    return logs, model


def unbalanced_losses(model: Any, dataset: CountingDataset, batches: list[list[int]], args: argparse.Namespace) -> list[float]:
    """One process, no sharding, no packing, no balancer: each global batch's token-mean loss, same optimizer."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for ids in batches:
        seqs = [dataset[i]["input_ids"][None].to(device) for i in ids]
        tokens = sum(s.shape[1] - 1 for s in seqs)  # loss tokens: all but each sequence's first
        loss = sum(token_loss_sum(model(input_ids=s, use_cache=False).logits, s) for s in seqs) / tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def main() -> None:
    args = parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if rank == 0:
        print(f"{world} rank(s), FSDP2 (fully_shard per decoder layer); {args.num_samples:,} samples of {args.lengths} "
              f"capped at {args.max_length} tokens; {args.tokens_per_step:,} tokens per step; micro-batches of at "
              f"most {args.micro_batch_tokens:,} tokens; attn_implementation={args.attn}; "
              f"{'lockstep, resharding every micro-batch' if args.reshard else 'accumulating unsharded'}", flush=True)
    logs, _ = train(rank, world, args)
    if rank == 0:
        for log in logs:
            print(f"step {log.step:>3}  loss {log.loss:.6f}  {len(log.sample_ids):>3} sequences  "
                  f"micro-batches per rank {log.micro_batches}  held unsharded between micro-batches "
                  f"{log.held_bytes / 2**20:.2f} MiB  {log.seconds:.2f} s", flush=True)
        if args.check:
            worst = max(abs(log.loss - log.reference_loss) / log.reference_loss for log in logs)  # type: ignore[operator]
            print(f"unbalanced reference (one process, unsharded, unpacked): largest relative loss difference "
                  f"{worst:.1e} over {len(logs)} steps", flush=True)
    dist.barrier()  # all ranks done before teardown (gloo can abort a rank whose peer tears down first)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
