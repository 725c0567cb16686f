"""The balanced loader feeding a Hugging Face model sharded with FSDP2 (``fully_shard``), on 2 gloo processes.

Ranks run different numbers of micro-batches per step; ``StepBatch.sync_context`` keeps
their FSDP2 collectives identical (``dataloader.loader.fsdp2_accumulation``), and the
losses equal the unbalanced single-process run on the same global batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6", allow_module_level=True)

from balancer.cost import CostModel  # noqa: E402
from balancer.selector import Balancer  # noqa: E402
from dataloader import BalancedDataLoader, hf_packed_inputs, packed_loss  # noqa: E402
from dataloader.loss import token_loss_sum  # noqa: E402
from strategies import ClusterSpec, Layout, Strategy  # noqa: E402
from strategies.runtime import run_local  # noqa: E402

WORLD = 2
STEPS = 3
VOCAB = 61
LR = 1e-2


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def dataset() -> list[dict[str, list[int]]]:
    rng = np.random.default_rng(7)
    return [{"input_ids": rng.integers(0, VOCAB, size=int(n)).tolist()} for n in rng.integers(3, 90, size=120)]


def _worker(rank: int, world: int) -> list[dict[str, Any]]:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    # Micro-batches of at most 96 tokens, so ranks get several and their counts differ.
    cost = CostModel.from_coefficients({Layout(1): (1e-9, 1e-6, 1e-4, 96)})
    balancer = Balancer(ClusterSpec(num_ranks=world, ranks_per_node=world), [Strategy.homogeneous(Layout(1), world)], cost)
    data = dataset()
    loader = BalancedDataLoader(data, balancer=balancer, lengths=np.array([len(d["input_ids"]) for d in data]),
                                tokens_per_step=700, seed=3, rank=rank, world_size=world)
    log = []
    for batch in loader:
        if batch.step == STEPS:
            break
        total = torch.zeros(())
        for k, mb in enumerate(batch.micro_batches):
            with batch.sync_context(model, k):
                loss = packed_loss(model(**hf_packed_inputs(mb, model)).logits, mb, grad_divisor=world)
                loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(total)
        log.append({"loss": total.item() / world, "sample_ids": sorted(batch.plan.sample_ids()),
                    "micro_batches": [len(r.micro_batches) for r in batch.plan.replicas]})
    loader.close()
    return log


def unbalanced_losses(batches: list[list[int]]) -> list[float]:
    """One process, no sharding, no packing: each global batch's token-mean loss, then the same optimizer step."""
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    data = dataset()
    losses = []
    for ids in batches:
        seqs = [torch.tensor([data[i]["input_ids"]]) for i in ids]
        tokens = sum(s.shape[1] - 1 for s in seqs)  # loss tokens: every token but each sequence's first
        loss = sum(token_loss_sum(model(input_ids=s, use_cache=False).logits, s) for s in seqs) / tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ~15 s: two forked ranks import transformers and train 3 steps of a 2-layer Llama.
def test_fsdp2_losses_equal_the_unbalanced_run() -> None:
    logs = run_local(_worker, WORLD, timeout_s=240, collective_timeout_s=60)
    assert logs[0] == logs[1]  # every rank saw the same plans and the same all-reduced loss
    log = logs[0]
    assert len(log) == STEPS
    # The case the FSDP2 accumulation exists for: ranks ran different numbers of micro-batches.
    assert any(len(set(s["micro_batches"])) > 1 for s in log), [s["micro_batches"] for s in log]
    want = unbalanced_losses([s["sample_ids"] for s in log])
    got = [s["loss"] for s in log]
    # fp32: summing ~700 token losses of ~4 in another order moves the mean by a few ulp
    # (4e-7 each); a cross-sequence leak or a wrong normalisation moves it by 1e-4 or more.
    assert got == pytest.approx(want, rel=1e-6, abs=0)
