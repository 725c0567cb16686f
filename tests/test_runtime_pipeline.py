"""strategies.runtime.pipeline: the stage split, the 1F1B schedule, and exact pipeline training.

The schedule is checked as data (every micro-batch once forward then backward, in order,
at most ``pp − p`` in flight, and no stage waiting forever under rendezvous sends, for
every ``pp`` and micro-batch count). Two gloo runs train a 3-block GPT (pp2 stages are
uneven: blocks {0, 1} and {2}) for 6 AdamW steps, switching strategy every step, and are
compared with one process on the same global batches — gradients every step, parameters
after 3 and 6 steps, losses:

* 4 processes: pp2×2, tp2pp2, pp2 + tp1×2 with the pipeline replica idle (one empty
  micro-batch), cp2pp2, tp1×4, pp2 + tp2 with ranks out of order; plus the bytes of
  compute weights a stage holds and a bf16 step (activations cross stages in bf16);
* 8 processes (about 15 s): tp2pp2×2, tp2pp2 + tp1×4, pp2×4 with one replica idle,
  cp2pp2 + tp2×2, pp3 + pp2 + tp1×3 (one block per pp3 stage), and tp2pp2 + pp2 + tp2
  with ranks out of order.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_runtime_engine import flat, flat_grads, flat_params, global_batch, loss_tokens, pack, plan_from

from strategies import Layout, Replica, Strategy
from strategies.runtime import (
    GPT,
    SINGLE_DEVICE,
    Engine,
    EngineConfig,
    ModelConfig,
    StageSpec,
    check_micro_batch,
    one_f_one_b,
    prepare_micro_batch,
    run_local,
    head_blocks,
    split_layers,
)
from strategies.runtime.pipeline import stage_units
from strategies.runtime.state import unit_name
from strategies.stages import BACKWARD, FORWARD, P2P, RECV, SEND, Compute, Exchange, split_stages, stage_imbalance

WORLD = 4
MODEL = dict(vocab_size=128, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, ffn_hidden_size=128)
PP2, TP2PP2, CP2PP2 = Layout(1, 1, 2), Layout(2, 1, 2), Layout(1, 2, 2)
TP1, TP2 = Layout(1), Layout(2)


# -- the stage split ------------------------------------------------------------------------------
LLAMA_7B = ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                       ffn_hidden_size=11008)


def test_the_split_of_the_test_model_is_the_count_split() -> None:
    # the LM head is 0.05 of a block here (at 2,048 tokens attention dominates a block of width 64):
    # the split is the count split, blocks {0, 1} | {2}, under tp1 and tp2 alike
    cfg = ModelConfig(**MODEL)
    assert head_blocks(cfg) == pytest.approx(0.0507, abs=1e-4)
    for layout in (PP2, TP2PP2, CP2PP2):
        assert split_layers(cfg, layout) == [range(0, 2), range(2, 3)]


def test_a_large_vocabulary_moves_blocks_off_the_last_stage() -> None:
    cfg = ModelConfig(**{**MODEL, "num_layers": 4, "vocab_size": 8192})  # head: 3.2 blocks
    assert 3 < head_blocks(cfg) < 4
    assert split_layers(cfg, PP2) == [range(0, 3), range(3, 4)]  # the count split was 2 | 2 + head
    assert StageSpec.busiest(cfg, PP2) == StageSpec.of(cfg, PP2, 1)  # 1 + 3.2 blocks > 3
    # under tp2 the head is split by vocabulary like the blocks: the same share, the same split
    assert head_blocks(cfg, 2) == pytest.approx(head_blocks(cfg))
    assert split_layers(cfg, TP2PP2) == [range(0, 3), range(3, 4)]
    assert split_layers(cfg, Layout(1, 1, 4)) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]


@pytest.mark.parametrize(("layout", "sizes", "ratio"), [
    # Llama-7B: the head is 0.62 of a block on one rank, and on each rank of tp4 (split by vocabulary)
    (Layout(1, 1, 2), [16, 16], 1.019), (Layout(1, 1, 4), [8] * 4, 1.057), (Layout(1, 1, 8), [4] * 8, 1.134),
    (Layout(4, 1, 2), [16, 16], 1.019), (Layout(4, 1, 4), [8] * 4, 1.057), (Layout(4, 1, 8), [4] * 8, 1.134),
])
def test_llama_7b_split_and_its_slowest_stage_over_the_ideal(layout: Layout, sizes: list[int], ratio: float) -> None:
    """max stage / (total / pp): what the pipeline loses to unequal stages, which the planner's
    equal stages leave out. The head (0.62 block, at tp1 and tp4) fits no whole block: the count split stays."""
    stages = split_layers(LLAMA_7B, layout)
    assert [len(r) for r in stages] == sizes
    extra = head_blocks(LLAMA_7B, layout.tp)
    assert stage_imbalance(stages, last_extra=extra) == pytest.approx(ratio, abs=1e-3)
    count = stage_imbalance(split_stages(LLAMA_7B.num_layers, layout.pp), last_extra=extra)
    assert stage_imbalance(stages, last_extra=extra) <= count


def test_split_layers_rejects_more_stages_than_blocks() -> None:
    with pytest.raises(ValueError, match=r"pp=5 exceeds num_layers=4.*max_pp"):
        split_layers(ModelConfig(**{**MODEL, "num_layers": 4}), Layout(1, 1, 5))


@pytest.mark.parametrize("pp", [1, 2, 3])
def test_every_parameter_unit_belongs_to_exactly_one_stage(pp: int) -> None:
    with torch.device("meta"):
        names = list(dict.fromkeys(unit_name(n) for n, _ in GPT(ModelConfig(**MODEL)).named_parameters()))
    owned = [stage_units(names, StageSpec.of(ModelConfig(**MODEL), Layout(1, 1, pp), p)) for p in range(pp)]
    assert sorted(j for units in owned for j in units) == list(range(len(names)))
    assert names.index("embed") in owned[0] and names.index("lm_head") in owned[-1]
    with pytest.raises(ValueError, match="belongs to no pipeline stage"):
        stage_units([*names, "adapter"], StageSpec.of(ModelConfig(**MODEL), Layout(1, 1, pp), 0))


# -- the schedule ---------------------------------------------------------------------------------
@given(pp=st.integers(1, 6), v=st.integers(1, 12))
def test_one_f_one_b_runs_each_micro_batch_once_in_order_with_bounded_memory(pp: int, v: int) -> None:
    for p in range(pp):
        ops = one_f_one_b(pp, p, v)
        computes = [op for op in ops if isinstance(op, Compute)]
        assert [op.micro_batch for op in computes if op.kind == FORWARD] == list(range(v))
        assert [op.micro_batch for op in computes if op.kind == BACKWARD] == list(range(v))
        in_flight = peak = 0
        for op in computes:
            in_flight += 1 if op.kind == FORWARD else -1
            assert in_flight >= 0  # a backward never precedes its forward
            peak = max(peak, in_flight)
        assert peak == min(pp - p, v)  # 1F1B: at most pp − p activations held (GPipe: v)
        p2p = [o for op in ops if isinstance(op, Exchange) for o in op.ops]
        boundaries = (p > 0) + (p < pp - 1)  # each micro-batch: one activation and one gradient per boundary
        assert len(p2p) == 2 * v * boundaries


def _simulate(pp: int, v: int) -> None:
    """Run every stage's op list with rendezvous semantics (a send completes only when the peer
    has posted the matching receive, as NCCL does for large messages); assert that every stage
    finishes and that each compute finds its inputs."""
    progs = [one_f_one_b(pp, p, v) for p in range(pp)]
    pos = [0] * pp
    pending: list[set[P2P] | None] = [None] * pp
    have_act = [set() for _ in range(pp)]
    have_grad = [set() for _ in range(pp)]
    done_forward = [set() for _ in range(pp)]
    moved = True
    while moved:
        moved = False
        for p in range(pp):
            while pos[p] < len(progs[p]) and isinstance(progs[p][pos[p]], Compute):
                op = progs[p][pos[p]]
                k = op.micro_batch
                if op.kind == FORWARD:
                    assert p == 0 or k in have_act[p], f"stage {p} forward {k} before its activation arrived"
                    done_forward[p].add(k)
                else:
                    assert k in done_forward[p], f"stage {p} backward {k} before its forward"
                    assert p == pp - 1 or k in have_grad[p], f"stage {p} backward {k} before its gradient arrived"
                pos[p] += 1
                moved = True
            if pos[p] < len(progs[p]) and pending[p] is None:
                pending[p] = set(progs[p][pos[p]].ops)
        for p in range(pp):
            for op in list(pending[p] or ()):
                q = p + op.peer_offset
                match = P2P(RECV if op.direction == SEND else SEND, op.what, op.micro_batch)
                if pending[q] is not None and match in pending[q]:
                    pending[p].discard(op)
                    pending[q].discard(match)
                    recv_stage, recv_op = (q, match) if op.direction == SEND else (p, op)
                    (have_act if recv_op.what == "act" else have_grad)[recv_stage].add(recv_op.micro_batch)
                    moved = True
        for p in range(pp):
            if pending[p] is not None and not pending[p]:
                pending[p] = None
                pos[p] += 1
                moved = True
    stuck = {p: progs[p][pos[p]] for p in range(pp) if pos[p] < len(progs[p])}
    assert not stuck, f"pp={pp}, v={v}: stages wait forever at {stuck}"


@settings(max_examples=60)
@given(pp=st.integers(1, 8), v=st.integers(1, 16))
def test_one_f_one_b_never_deadlocks(pp: int, v: int) -> None:
    _simulate(pp, v)


def test_a_stage_without_micro_batches_returns_its_loss_on_the_model_device() -> None:
    """No micro-batch at all (nothing to infer a device from): the summed loss must still be on
    the model's device — on CUDA the engine stacks it with device tensors. The meta device
    stands in for CUDA here: a CPU tensor would be the bug."""
    from contextlib import nullcontext

    from strategies.runtime import PipelineStage, run_pipeline

    with torch.device("meta"):
        model = GPT(ModelConfig(**MODEL))
    for p in (0, 1):
        spec = StageSpec.of(ModelConfig(**MODEL), PP2, p)
        stage = PipelineStage(spec=spec, units=frozenset(), prev_rank=None if spec.first else 0,
                              next_rank=1 if spec.first else None, prev_group=None, next_group=None)
        loss = run_pipeline(model, stage, SINGLE_DEVICE, [], 1, act_dtype=torch.float32, autocast=nullcontext)
        assert loss.device.type == "meta" and loss.dtype == torch.float64


# -- exact training on 4 processes ----------------------------------------------------------------
def candidates() -> list[Strategy]:
    return [
        Strategy.homogeneous(PP2, WORLD),                 # tp1pp2x2: (0,1) (2,3)
        Strategy.homogeneous(TP2PP2, WORLD),              # tp2pp2x1: stage 0 = (0,1), stage 1 = (2,3)
        Strategy.from_counts([(PP2, 1), (TP1, 2)]),       # tp1pp2x1+tp1x2: (0,1) (2) (3)
        Strategy.homogeneous(CP2PP2, WORLD),              # tp1cp2pp2x1: stage 0 = cp (0,1), stage 1 = cp (2,3)
        Strategy.homogeneous(TP1, WORLD),                 # tp1x4
        # ranks out of order: stage 0 is global rank 3, stage 1 rank 0; tp rank 0 of the tp2 is rank 2
        Strategy("permuted", (Replica(PP2, (3, 0)), Replica(TP2, (2, 1)))),
    ]


SCHEDULE = ["tp1pp2x2", "tp2pp2x1", "tp1pp2x1+tp1x2", "tp1cp2pp2x1", "tp1x4", "permuted"]
"""Strategy of each optimizer step."""
IDLE = {2: 0}
"""step → replica that gets no sequence: the pipeline replica runs one empty micro-batch."""


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # eps=1e-6 as in test_runtime_engine: keeps Adam's division well-conditioned at fp32 rounding
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)


def make_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**MODEL))


def make_plan(step: int, strategy: Strategy, seqs: list[np.ndarray], idle: int | None = None):
    """Round-robin sequences over the busy replicas: three micro-batches on a pipeline (v > pp,
    so 1F1B reaches its steady state), two elsewhere."""
    busy = [j for j in range(len(strategy.replicas)) if j != idle]
    per: list[list[int]] = [[] for _ in strategy.replicas]
    for i in range(len(seqs)):
        per[busy[i % len(busy)]].append(i)
    assignment = []
    for rep, ids in zip(strategy.replicas, per):
        v = 3 if rep.layout.pp > 1 else 2
        assignment.append([ids[k::v] for k in range(v)] if len(ids) >= v else ([ids] if ids else []))
    return plan_from(step, strategy, seqs, assignment)


def stage_compute_bytes(engine: Engine, name: str) -> int:
    """fp32 compute weights + fp32 gradient accumulators of this rank's shard of its stage."""
    view = engine.view(name)
    units = None if view.stage is None else view.stage.units
    tp = view.layout.tp
    return sum(8 * (s.numel // (tp if s.split_dim is not None else 1))
               for s in engine.state.layout.slots if units is None or s.unit in units)


def _worker(rank: int, world: int) -> dict:
    by_name = {s.name: s for s in candidates()}
    out: dict = {"losses": [], "grads": [], "snapshots": {}, "compute_bytes": []}
    engine = Engine(candidates(), make_model, make_optimizer)
    for step, name in enumerate(SCHEDULE):
        seqs = global_batch(step)
        plan = make_plan(step, by_name[name], seqs, IDLE.get(step))
        glt = loss_tokens(seqs)
        mbs = [pack([seqs[i % 1000] for i in mb], list(mb), glt) for mb in plan.for_rank(rank).micro_batches]
        result = engine.step(plan, SimpleNamespace(micro_batches=mbs, global_loss_tokens=glt, plan=plan))
        out["losses"].append(result.loss)
        out["grads"].append(flat(engine.full_gradients()))
        held = result.resident_bytes
        held_compute = held["compute_weights"] + held["compute_grads"]
        out["compute_bytes"].append((held_compute, stage_compute_bytes(engine, name)))
        if step + 1 in (3, len(SCHEDULE)):
            out["snapshots"][step + 1] = flat(engine.full_parameters())
    out["bf16"] = _bf16_pipeline_vs_data_parallel(rank)
    return out


def _bf16_pipeline_vs_data_parallel(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same step under bf16 autocast as pp2×2 and as tp1×4: activations cross stages in bf16."""
    grads = []
    for strategy in (Strategy.homogeneous(PP2, WORLD), Strategy.homogeneous(TP1, WORLD)):
        engine = Engine([strategy], make_model, make_optimizer, config=EngineConfig(autocast_dtype=torch.bfloat16))
        seqs = global_batch(7)
        plan = make_plan(7, strategy, seqs)
        glt = loss_tokens(seqs)
        mbs = [pack([seqs[i % 1000] for i in mb], list(mb), glt) for mb in plan.for_rank(rank).micro_batches]
        engine.step(plan, mbs)
        grads.append(flat(engine.full_gradients()))
    return grads[0], grads[1]


def _reference() -> tuple[dict[int, torch.Tensor], list[float], list[torch.Tensor]]:
    """Single-process training on the same global batches (one packed row per step)."""
    model = make_model()
    opt = make_optimizer(model)
    snapshots, losses, grads = {}, [], []
    for step in range(len(SCHEDULE)):
        seqs = global_batch(step)
        glt = loss_tokens(seqs)
        mb = check_micro_batch(pack(seqs, list(range(len(seqs))), glt), 0, MODEL["vocab_size"])
        opt.zero_grad()
        loss = model(prepare_micro_batch(mb, SINGLE_DEVICE, torch.device("cpu"))) / glt
        loss.backward()
        grads.append(flat_grads(model))
        opt.step()
        losses.append(loss.item())
        if step + 1 in (3, len(SCHEDULE)):
            snapshots[step + 1] = flat_params(model)
    return snapshots, losses, grads


@pytest.fixture(scope="module")
def run() -> list[dict]:
    torch.set_num_threads(1)
    return run_local(_worker, WORLD, timeout_s=180, collective_timeout_s=30)


@pytest.fixture(scope="module")
def reference() -> tuple[dict[int, torch.Tensor], list[float], list[torch.Tensor]]:
    return _reference()


def test_gradients_equal_single_device_every_step(run, reference):
    _, _, want = reference
    for step, g in enumerate(want):
        for rank, out in enumerate(run):
            # a stage's gradient reaches each owner once per replica; a double or missing
            # contribution is off by O(1) of the gradient, rounding by ~1e-6 of its largest entry
            torch.testing.assert_close(out["grads"][step], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                       msg=lambda m, r=rank, s=step: f"rank {r} step {s} ({SCHEDULE[s]}): {m}")


def test_parameters_equal_single_device_after_3_and_6_adamw_steps(run, reference):
    want, _, _ = reference
    for n_steps in (3, len(SCHEDULE)):
        for rank, out in enumerate(run):
            torch.testing.assert_close(out["snapshots"][n_steps], want[n_steps], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, r=rank, n=n_steps: f"rank {r} after {n} steps: {m}")
        assert (want[n_steps] - flat_params(make_model())).abs().max() > 1e-3  # training moved them


def test_loss_is_the_global_token_mean_once_per_replica(run, reference):
    _, want, _ = reference
    for out in run:
        np.testing.assert_allclose(out["losses"], want, rtol=1e-5)


def test_a_pipeline_rank_holds_only_its_stage_compute_weights(run):
    for out in run:
        for step, (held, expected) in enumerate(out["compute_bytes"]):
            assert held == expected, f"step {step} ({SCHEDULE[step]}): {held} vs {expected}"
    # rank 0 in tp1pp2x2 is stage 0 of 2 (embedding + blocks 0, 1): less than the whole model
    assert run[0]["compute_bytes"][0][0] < run[0]["compute_bytes"][4][0]


def test_bf16_activations_between_stages_give_the_data_parallel_gradient(run):
    for out in run:
        pipe, flat_dp = out["bf16"]
        # bf16 (8 mantissa bits) forwards in a different order: differences ~1e-2 of the scale
        torch.testing.assert_close(pipe, flat_dp, rtol=0.05, atol=0.02 * float(flat_dp.abs().max()))
        assert float(flat_dp.abs().max()) > 0


# -- 8 processes: the issue's layouts ---------------------------------------------------------------
WORLD8 = 8


def candidates8() -> list[Strategy]:
    return [
        Strategy.homogeneous(TP2PP2, WORLD8),                                    # tp2pp2x2
        Strategy.from_counts([(TP2PP2, 1), (TP1, 4)]),                           # tp2pp2x1+tp1x4
        Strategy.homogeneous(PP2, WORLD8),                                       # tp1pp2x4
        Strategy.from_counts([(CP2PP2, 1), (TP2, 2)]),                           # tp1cp2pp2x1+tp2x2
        Strategy.from_counts([(Layout(1, 1, 3), 1), (PP2, 1), (TP1, 3)]),        # tp1pp3x1+tp1pp2x1+tp1x3
        Strategy("permuted8", (Replica(TP2PP2, (7, 2, 5, 0)), Replica(PP2, (1, 6)), Replica(TP2, (3, 4)))),
    ]


SCHEDULE8 = ["tp2pp2x2", "tp2pp2x1+tp1x4", "tp1pp2x4", "tp1cp2pp2x1+tp2x2", "tp1pp3x1+tp1pp2x1+tp1x3", "permuted8"]
IDLE8 = {2: 1}


def _worker8(rank: int, world: int) -> dict:
    by_name = {s.name: s for s in candidates8()}
    out: dict = {"losses": [], "grads": [], "snapshots": {}}
    engine = Engine(candidates8(), make_model, make_optimizer)
    for step, name in enumerate(SCHEDULE8):
        seqs = global_batch(step)
        plan = make_plan(step, by_name[name], seqs, IDLE8.get(step))
        glt = loss_tokens(seqs)
        mbs = [pack([seqs[i % 1000] for i in mb], list(mb), glt) for mb in plan.for_rank(rank).micro_batches]
        out["losses"].append(engine.step(plan, mbs).loss)
        out["grads"].append(flat(engine.full_gradients()))
        if step + 1 in (3, len(SCHEDULE8)):
            out["snapshots"][step + 1] = flat(engine.full_parameters())
    return out


@pytest.fixture(scope="module")
def run8() -> list[dict]:
    torch.set_num_threads(1)
    return run_local(_worker8, WORLD8, timeout_s=240, collective_timeout_s=60)


def test_eight_processes_train_exactly_under_the_issue_layouts(run8, reference):
    params, losses, grads = reference
    for rank, out in enumerate(run8):
        for step, g in enumerate(grads):
            torch.testing.assert_close(out["grads"][step], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                       msg=lambda m, r=rank, s=step: f"rank {r} step {s} ({SCHEDULE8[s]}): {m}")
        for n_steps in (3, len(SCHEDULE8)):
            torch.testing.assert_close(out["snapshots"][n_steps], params[n_steps], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, r=rank, n=n_steps: f"rank {r} after {n} steps: {m}")
        np.testing.assert_allclose(out["losses"], losses, rtol=1e-5)
