"""The balanced loader feeding a Hugging Face model sharded with FSDP2 (``fully_shard``), on 2 gloo processes.

The loop of ``examples/fsdp2_loop.py`` runs on both ranks, in both modes, in one pair of
processes:

* default (``sync_context(model, k)``): ranks run different numbers of micro-batches per
  step; FSDP2 holds parameters and gradients unsharded until each rank's last one
  (``dataloader.batch.fsdp2_accumulation``);
* ``--reshard`` (``lockstep_micro_batches`` + ``sync_context(model, k, mode="reshard")``):
  every rank runs the step's largest count, padded with zero-loss one-token rows, and
  FSDP2 reshards after every micro-batch.

In both, the losses and the final parameters equal the unbalanced single-process run on
the same global batches, computed here independently.
"""

from __future__ import annotations

import argparse
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
MODES = {"accumulate": False, "reshard": True}


def _worker(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    for mode, reshard in MODES.items():
        logs, model = fsdp2_loop.train(rank, world, argparse.Namespace(**{**vars(ARGS), "reshard": reshard}))
        full = {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in model.named_parameters()}
        out[mode] = {"logs": [asdict(log) for log in logs], "params": {n: t.detach().clone() for n, t in full.items()}}
    return out


def unbalanced_run(batches: list[list[int]]) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, no sharding, no packing, no balancer: each global batch's token-mean loss, same optimizer;
    the losses and the final parameters."""
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
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    """Both modes on 2 ranks, and the unbalanced reference on the accumulate run's global batches.

    ~10-15 s on a 2-core machine (about as long as one mode alone took): two forked ranks
    import transformers once and train 3 steps of a 2-layer Llama in each mode."""
    ranks = run_local(_worker, WORLD, timeout_s=300, collective_timeout_s=60)
    batches = [s["sample_ids"] for s in ranks[0]["accumulate"]["logs"]]
    want_losses, want_params = unbalanced_run(batches)
    return {"ranks": ranks, "batches": batches, "losses": want_losses, "params": want_params}


def _check_against_the_unbalanced_run(runs: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    logs = [r[mode]["logs"] for r in runs["ranks"]]
    strip = [[{k: v for k, v in s.items() if k != "seconds"} for s in log] for log in logs]
    assert strip[0] == strip[1]  # every rank saw the same plans and the same all-reduced loss
    log = logs[0]
    assert [s["step"] for s in log] == list(range(ARGS.steps))
    assert [s["sample_ids"] for s in log] == runs["batches"]  # both modes train the same global batches
    # The case both modes exist for: ranks were given different numbers of micro-batches.
    assert any(len(set(s["micro_batches"])) > 1 for s in log), [s["micro_batches"] for s in log]
    # fp32: summing ~1000 token losses of ~4.8 in another order moves the mean by a few ulp
    # (5e-7 each); a cross-sequence leak or a wrong normalisation moves it by 1e-4 or more.
    assert [s["loss"] for s in log] == pytest.approx(runs["losses"], rel=1e-6, abs=0)
    # The final parameters after 3 AdamW steps: they moved by up to 9.1e-3 (lr 3e-3; a wrong
    # gradient moves an element by ~lr). The gradients differ from the reference by fp32
    # summation order only, which AdamW's g/√v amplifies where a gradient is tiny:
    # measured ≤ 7.8e-6 (accumulate) and ≤ 8.4e-6 (reshard), on lm_head.
    for name, want in runs["params"].items():
        for r, ranked in enumerate(runs["ranks"]):
            got = ranked[mode]["params"][name]
            assert torch.allclose(got, want, rtol=0, atol=3e-5), (mode, r, name, float((got - want).abs().max()))
    return log


def test_fsdp2_accumulate_equals_the_unbalanced_run_and_holds_the_model(runs: dict[str, Any]) -> None:
    log = _check_against_the_unbalanced_run(runs, "accumulate")
    # Between micro-batches a rank holds every parameter and its gradient unsharded (fp32: 8 bytes each).
    whole = 8 * sum(t.numel() for t in runs["params"].values())
    assert all(s["held_bytes"] == whole for s in log if max(s["micro_batches"]) > 1), (whole, log)


def test_fsdp2_reshard_equals_the_unbalanced_run_and_reshards_every_micro_batch(runs: dict[str, Any]) -> None:
    log = _check_against_the_unbalanced_run(runs, "reshard")  # ranks with fewer micro-batches padded, no hang
    # After every micro-batch but the step's last, every parameter on every rank is a DTensor
    # shard again: nothing unsharded (parameters nor gradients) is held between micro-batches.
    assert [s["held_bytes"] for s in log] == [0] * ARGS.steps
