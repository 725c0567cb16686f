"""Hugging Face Trainer with balanced, packed steps: override get_train_dataloader and training_step.

    python examples/hf_trainer.py --steps 4
    torchrun --nproc_per_node 2 examples/hf_trainer.py --steps 4     # DDP through accelerate

A tiny randomly initialised ``LlamaForCausalLM`` (config only, nothing downloaded) trains
on a ``datasets.Dataset`` whose sequence lengths are real (a bundled length file). What
the subclass changes (see docs/integrations/hf_trainer.md):

* ``get_train_dataloader`` returns a :class:`BalancedDataLoader` over the train dataset:
  one item per optimizer step (so ``gradient_accumulation_steps=1``), holding this rank's
  packed micro-batches;
* ``training_step`` runs those micro-batches — forward with ``hf_packed_inputs(mb, model)``
  (the inputs that keep attention inside each packed sequence for the model's attention
  implementation), ``packed_loss`` (divided by the step's global loss-token count, times
  the DDP world size), backward with DDP ``no_sync`` on all but the last.

Everything else — optimizer, scheduler, clipping, logging, checkpoints — stays the Trainer's.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from typing import Any, Iterator

import numpy as np
import torch

from balancer.cost import CostModel
from balancer.data import bundled_names, read_lengths
from balancer.selector import Balancer
from balancer.specs import ModelSpec
from dataloader import BalancedDataLoader, PackedCollator, hf_packed_inputs, packed_loss
from strategies import ClusterSpec, Layout, Strategy


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="sft_gpteacher", help=f"bundled length file ({', '.join(bundled_names())})")
    p.add_argument("--num-samples", type=int, default=2000, help="dataset size (first N lengths)")
    p.add_argument("--max-length", type=int, default=512, help="cap on sequence length, tokens")
    p.add_argument("--tokens-per-step", type=int, default=4096, help="tokens per optimizer step, all ranks together")
    p.add_argument("--micro-batch-tokens", type=int, default=2048, help="most tokens in one packed micro-batch")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--output-dir", default=None, help="Trainer output_dir (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class StepBatches:
    """The balanced loader as the Trainer sees it: one dict per optimizer step.

    Each item is ``{"micro_batches": [packed dicts], "step": int}``; the Trainer's
    ``_prepare_inputs`` moves the tensors inside to the device.
    """

    def __init__(self, loader: BalancedDataLoader) -> None:
        self.loader = loader
        self.dataset = loader.dataset  # the Trainer counts examples with len(dataloader.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield {"micro_batches": batch.micro_batches, "step": batch.step}


def build_trainer(args: argparse.Namespace) -> Any:
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)  # random initialisation from the config; nothing is downloaded

    lengths = np.minimum(read_lengths(args.lengths)[: args.num_samples], args.max_length)
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, config.vocab_size, size=lengths.size)
    ids = [((s + np.arange(n)) % config.vocab_size).tolist() for s, n in zip(starts, lengths)]
    train = datasets.Dataset.from_dict({"input_ids": ids})  # token lists; lengths read from Arrow offsets

    # The cost model: analytic a·s² + b·s for this model's shape, micro-batches capped at
    # --micro-batch-tokens. DDP replicas hold the whole model: one candidate, tp1 on every rank.
    spec = ModelSpec(name="tiny-llama", num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                     num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                     ffn_hidden_size=config.intermediate_size, vocab_size=config.vocab_size, dtype_bytes=4)
    tp1 = CostModel.analytic(spec, "cpu").cost(Layout(1))
    cost = CostModel.from_coefficients({Layout(1): (tp1.a, tp1.b, tp1.c, args.micro_batch_tokens, tp1.d)})

    class BalancedTrainer(Trainer):
        def get_train_dataloader(self) -> Any:
            world = self.args.world_size
            cluster = ClusterSpec(num_ranks=world, ranks_per_node=world)
            balancer = Balancer(cluster, [Strategy.homogeneous(Layout(1), world)], cost)
            loader = BalancedDataLoader(self.train_dataset, balancer=balancer, collate_fn=PackedCollator(),
                                        tokens_per_step=args.tokens_per_step, seed=self.args.seed,
                                        rank=self.args.process_index, world_size=world)
            return StepBatches(loader)

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
            model.train()
            world = self.args.world_size
            mbs = inputs["micro_batches"]
            total = torch.zeros((), device=self.args.device)
            for k, mb in enumerate(mbs):
                sync = k == len(mbs) - 1
                with self.accelerator.no_sync(model) if not sync and world > 1 else contextlib.nullcontext():
                    out = model(**hf_packed_inputs(mb, model))  # attention stays inside each sequence
                    loss = packed_loss(out.logits, mb, grad_divisor=world)
                    self.accelerator.backward(loss)
                total += loss.detach()
            return total  # this rank's share × world; the Trainer's mean over ranks is the global mean

        def floating_point_ops(self, inputs: dict[str, Any]) -> int:
            tokens = sum(int(mb["input_ids"].numel()) for mb in inputs["micro_batches"])
            return 6 * tokens * self.model.num_parameters()

    out_dir = args.output_dir or tempfile.mkdtemp(prefix="hydraulis-hf-")
    training_args = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, learning_rate=args.lr, gradient_accumulation_steps=1,
        per_device_train_batch_size=1, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False, seed=args.seed, disable_tqdm=True, lr_scheduler_type="constant",
    )
    return BalancedTrainer(model=model, args=training_args, train_dataset=train)


def main() -> None:
    args = parse_args()
    trainer = build_trainer(args)
    result = trainer.train()
    if trainer.is_world_process_zero():
        losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
        print(f"trained {result.global_step} balanced steps; losses {losses}; final {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
