"""The balanced loader feeding a Hugging Face model sharded with FSDP2 (``fully_shard``), on 2 gloo processes.

The loop of ``examples/fsdp2_loop.py`` runs on both ranks. Ranks run different numbers
of micro-batches per step; ``StepBatch.sync_context`` keeps their FSDP2 collectives
identical (``dataloader.batch.fsdp2_accumulation``), and the losses equal the unbalanced
single-process run on the same global batches, computed here independently.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6", allow_module_level=True)

from dataloader.loss import token_loss_sum  # noqa: E402
from strategies.runtime import run_local  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the example's loop is what runs (children import it too)
import fsdp2_loop  # noqa: E402

WORLD = 2
# Small micro-batches (160 tokens) of real SFT lengths: ranks get several, and their counts differ.
ARGS = fsdp2_loop.parse_args(["--lengths", "sft_gpteacher", "--num-samples", "300", "--max-length", "128",
                              "--tokens-per-step", "1200", "--micro-batch-tokens", "160", "--steps", "3"])


def _worker(rank: int, world: int) -> list[dict[str, Any]]:
    return [asdict(log) for log in fsdp2_loop.train(rank, world, ARGS)]


def unbalanced_losses(batches: list[list[int]]) -> list[float]:
    """One process, no sharding, no packing, no balancer: each global batch's token-mean loss, same optimizer."""
    model = fsdp2_loop.build_model(ARGS)  # the same initial weights (seeded)
    dataset = fsdp2_loop.build_dataset(ARGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ARGS.lr)
    losses = []
    for ids in batches:
        seqs = [dataset[i]["input_ids"][None] for i in ids]
        tokens = sum(s.shape[1] - 1 for s in seqs)  # loss tokens: every token but each sequence's first
        loss = sum(token_loss_sum(model(input_ids=s, use_cache=False).logits, s) for s in seqs) / tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ~15 s on an idle 2-core machine: two forked ranks import transformers and train 3 steps of a 2-layer Llama.
def test_fsdp2_losses_equal_the_unbalanced_run() -> None:
    logs = run_local(_worker, WORLD, timeout_s=240, collective_timeout_s=60)
    strip = [[{k: v for k, v in s.items() if k != "seconds"} for s in log] for log in logs]
    assert strip[0] == strip[1]  # every rank saw the same plans and the same all-reduced loss
    log = logs[0]
    assert [s["step"] for s in log] == list(range(ARGS.steps))
    # The case the FSDP2 accumulation exists for: ranks ran different numbers of micro-batches.
    assert any(len(set(s["micro_batches"])) > 1 for s in log), [s["micro_batches"] for s in log]
    want = unbalanced_losses([s["sample_ids"] for s in log])
    got = [s["loss"] for s in log]
    # fp32: summing ~1000 token losses of ~4.8 in another order moves the mean by a few ulp
    # (5e-7 each); a cross-sequence leak or a wrong normalisation moves it by 1e-4 or more.
    assert got == pytest.approx(want, rel=1e-6, abs=0)
