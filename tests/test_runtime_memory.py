"""The sharded state in bf16 on 2 gloo processes: what a rank holds, byte for byte, and the gradients.

Under ``autocast_dtype=bfloat16`` the compute weights are gathered in bf16 and every
micro-batch's bf16 gradient is added into an fp32 accumulator (a post-accumulate-grad
hook). The run checks the bytes each rank holds per category against the layout and
against balancer's memory model of it (``AnalyticOptions(zero_stage="world")``), and the
reduce-scattered gradient against a single-process fp32 reference of the same weights
(bf16 rounding apart, the same vector). tests/test_runtime_engine.py does the same
memory-model check in fp32 at 4 ranks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_runtime_engine import flat, global_batch, loss_tokens, make_plan, memory_model_bytes, pack, rank_batches

from strategies import Layout, Strategy
from strategies.runtime import (
    GPT,
    SINGLE_DEVICE,
    Engine,
    EngineConfig,
    ModelConfig,
    check_micro_batch,
    prepare_micro_batch,
    run_local,
)

WORLD = 2
MODEL = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128)
SCHEDULE = ["tp2x1", "tp1x2", "tp1cp2x1"]


def _worker(rank: int, world: int) -> dict:
    strategies = [Strategy.homogeneous(Layout(2), world), Strategy.homogeneous(Layout(1), world),
                  Strategy.homogeneous(Layout(1, 2), world)]
    by_name = {s.name: s for s in strategies}
    engine = Engine(strategies, ModelConfig(**MODEL), lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                    config=EngineConfig(autocast_dtype=torch.bfloat16))
    out: dict = {"initial": engine.full_parameters(), "held": [], "grads": [], "kernel": engine.attention_kernel}
    for step, name in enumerate(SCHEDULE):
        seqs = global_batch(step)
        plan = make_plan(step, by_name[name], seqs)
        result = engine.step(plan, rank_batches(plan, rank, seqs))
        out["held"].append(dict(result.resident_bytes))
        out["grads"].append(flat(engine.full_gradients()))
        if step == 0:
            out["params_after_0"] = engine.full_parameters()
    slots = engine.state.layout.slots
    out["padded"] = sum(s.chunk for s in slots)
    out["local"] = sum(s.local_numel for s in slots)
    out["shard"] = {tp: sum(s.numel // (tp if s.split_dim is not None else 1) for s in slots) for tp in (1, 2)}
    out["num_params"] = len(slots)
    return out


@pytest.fixture(scope="module")
def run() -> list[dict]:
    return run_local(_worker, WORLD, timeout_s=120, collective_timeout_s=30)


def _reference_grad(params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    model = GPT(ModelConfig(**MODEL))
    model.load_state_dict(params)
    seqs = global_batch(step)
    glt = loss_tokens(seqs)
    mb = check_micro_batch(pack(seqs, list(range(len(seqs))), glt), 0, MODEL["vocab_size"])
    (model(prepare_micro_batch(mb, SINGLE_DEVICE, torch.device("cpu"))) / glt).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_bytes_held_per_category(run):
    for out in run:
        assert out["kernel"] == "sdpa"
        for name, held in zip(SCHEDULE, out["held"]):
            tp = 2 if name == "tp2x1" else 1
            assert held["master"] == held["grad"] == 4 * out["padded"]
            assert held["optimizer"] == 8 * out["local"] + 4 * out["num_params"]  # two fp32 moments + step
            assert held["compute_weights"] == 2 * out["shard"][tp], name  # bf16 tp shard
            assert held["compute_grads"] == 4 * out["shard"][tp], name  # fp32 accumulators
            # balancer's memory model (zero_stage="world", bf16) = the bytes held, to padding and AdamW's step
            model = memory_model_bytes(MODEL, 2, WORLD, Layout(tp, 2 if name == "tp1cp2x1" else 1))
            slack = (16 * WORLD + 4) * out["num_params"]
            assert 0 <= sum(held.values()) - model <= slack, (name, held, model)
    assert sum(out["local"] for out in run) == sum(v.numel() for v in run[0]["initial"].values())


def test_bf16_gradients_match_the_fp32_reference(run):
    for step, params in ((0, run[0]["initial"]), (1, run[0]["params_after_0"])):
        want = _reference_grad(params, step)
        for out in run:
            got = out["grads"][step]
            cos = float(torch.nn.functional.cosine_similarity(got, want, dim=0))
            rel = float((got - want).norm() / want.norm())
            assert cos > 0.9995 and rel < 0.02, (step, cos, rel)  # bf16 rounding: ~0.007
    np.testing.assert_array_equal(run[0]["grads"][2].numpy(), run[1]["grads"][2].numpy())
