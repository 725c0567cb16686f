"""strategies.runtime.Engine on 4 gloo processes: exact heterogeneous training on sharded state.

One 4-process run (module fixture) trains the reference GPT for 6 AdamW steps, switching
strategy every step — tp2+tp1×2 (one replica idle), cp2+tp1×2, tp1×4, tp2×2, tp2cp2, and
tp2+cp2 with out-of-order ranks — and, between steps, feeds the engine bad plans and
batches. Every rank holds 1/4 of the fp32 master parameters, gradients and AdamW state;
each step gathers its compute weights and reduce-scatters the gradients. It saves a
checkpoint before the first step and after the third; a 2-process job (another world
size, other strategies) loads them and trains the last three steps. The tests below
check both runs against a single-process reference trained on the same global batches.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from balancer.analytic import AnalyticModel
from balancer.analytic_options import AnalyticOptions
from balancer.specs import ModelSpec, hardware_preset
from strategies import Layout, Replica, Strategy
from strategies.plan import ReplicaPlan, StepPlan
from strategies.runtime import (
    GPT,
    SINGLE_DEVICE,
    Engine,
    EngineConfig,
    ModelConfig,
    StepError,
    check_micro_batch,
    prepare_micro_batch,
    run_local,
)

WORLD = 4
MODEL = dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=128)
TP1, TP2, CP2, TP2CP2 = Layout(1), Layout(2), Layout(1, 2), Layout(2, 2)
CAPACITY = {"tp1": 64, "tp2": 128, "tp1cp2": 128, "tp2cp2": 256}


def candidates() -> list[Strategy]:
    return [
        Strategy.homogeneous(TP1, WORLD),                 # tp1x4
        Strategy.homogeneous(TP2, WORLD),                 # tp2x2
        Strategy.from_counts([(TP2, 1), (TP1, 2)]),       # tp2x1+tp1x2: (0,1) (2) (3)
        Strategy.from_counts([(CP2, 1), (TP1, 2)]),       # tp1cp2x1+tp1x2: (0,1) (2) (3)
        Strategy.homogeneous(TP2CP2, WORLD),              # tp2cp2x1
        # ranks listed out of order: tp rank 0 is global rank 1, cp rank 0 is global rank 3
        Strategy("permuted", (Replica(TP2, (1, 0)), Replica(CP2, (3, 2)))),
    ]


SCHEDULE = ["tp2x1+tp1x2", "tp1cp2x1+tp1x2", "tp1x4", "tp2x2", "tp2cp2x1", "permuted"]
"""Strategy of each optimizer step."""
IDLE = {0: 2}
"""step → replica that gets no sequence (one explicit empty micro-batch)."""


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # eps=1e-5: Adam divides by sqrt(v)+eps, which multiplies a gradient's rounding error
    # by up to lr/eps where the gradient is near 0. Tensor parallelism sums the head's and the
    # blocks' partial products in another order than one device (a vocab-parallel head: the
    # hidden-state gradient as partial sums over vocabulary shards), so some gradients differ
    # by fp32 rounding, ~2e-9 absolute (3e-8 of the largest gradient) — measured on an
    # embedding element whose gradient cancels to 4e-7. With eps=1e-6 that one element became
    # a 1.5e-6 parameter difference after 3 steps (lr/eps = 1e3); with eps=1e-5 (lr/eps = 1e2)
    # rounding stays under 1e-7 while a wrong gradient (off by O(1e-2)) still moves parameters by O(1e-3).
    return torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)


def make_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**MODEL))


def global_batch(step: int) -> list[np.ndarray]:
    """Ten sequences of 1..30 tokens (lengths 1–3 exercise empty cp chunks)."""
    rng = np.random.default_rng(100 + step)
    lengths = [1, 2, 3, *rng.integers(4, 31, size=7)]
    rng.shuffle(lengths)
    return [rng.integers(0, MODEL["vocab_size"], size=int(s)) for s in lengths]


def loss_tokens(seqs: list[np.ndarray]) -> int:
    return sum(len(s) - 1 for s in seqs)


def pack(seqs: list[np.ndarray], sample_ids: list[int], glt: int) -> dict:
    """A packed micro-batch in the design.md §7 format (the test's own packer)."""
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ids = torch.from_numpy(np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, np.int64))[None]
    labels = ids.clone()
    labels[0, cu[:-1].astype(np.int64)] = -100
    pos = torch.from_numpy(np.concatenate([np.arange(s) for s in lens]) if seqs else np.zeros(0, np.int64))[None]
    return dict(
        input_ids=ids, labels=labels, position_ids=pos, cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(lens.max()) if len(lens) else 0, seq_lens=torch.from_numpy(lens),
        sample_ids=torch.tensor(sample_ids, dtype=torch.int64), num_loss_tokens=int((lens - 1).sum()),
        global_loss_tokens=glt,
    )


def plan_from(step: int, strategy: Strategy, seqs: list[np.ndarray], assignment: list[list[list[int]]]) -> StepPlan:
    """A StepPlan placing sequence indices ``assignment[replica][micro_batch]`` (sample id = step·1000 + index)."""
    reps = []
    for rep, mbs in zip(strategy.replicas, assignment):
        ids = tuple(tuple(step * 1000 + i for i in mb) for mb in mbs) or ((),)
        reps.append(ReplicaPlan(rep.ranks, rep.layout, ids, 0.0))
    used = [i for mbs in assignment for mb in mbs for i in mb]
    return StepPlan(
        step=step, strategy=strategy.name, replicas=tuple(reps), est_step_seconds=0.0, lower_bound_seconds=0.0,
        global_sequences=len(used), global_tokens=sum(len(seqs[i]) for i in used),
        global_loss_tokens=loss_tokens([seqs[i] for i in used]), solver="test",
    )


def make_plan(step: int, strategy: Strategy, seqs: list[np.ndarray], idle: int | None = None) -> StepPlan:
    """Round-robin sequences over the (non-idle) replicas, two micro-batches where possible."""
    busy = [j for j in range(len(strategy.replicas)) if j != idle]
    per: list[list[int]] = [[] for _ in strategy.replicas]
    for i in range(len(seqs)):
        per[busy[i % len(busy)]].append(i)
    assignment = [[ids[0::2], ids[1::2]] if len(ids) >= 2 else ([ids] if ids else []) for ids in per]
    return plan_from(step, strategy, seqs, assignment)


def rank_batches(plan: StepPlan, rank: int, seqs: list[np.ndarray]) -> list[dict]:
    glt = loss_tokens(seqs)
    return [pack([seqs[i % 1000] for i in mb], list(mb), glt) for mb in plan.for_rank(rank).micro_batches]


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().reshape(-1).clone() for p in model.parameters()])


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full tensors of the engine (model parameter order) as one vector."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def memory_model_bytes(model: dict, dtype_bytes: int, world: int, layout: Layout) -> float:
    """The analytic memory model of the runtime's layout (``zero_stage="world"``): static bytes per rank."""
    spec = ModelSpec(name="test", num_layers=model["num_layers"], hidden_size=model["hidden_size"],
                     num_heads=model["num_heads"], num_kv_heads=model["num_kv_heads"],
                     ffn_hidden_size=model["ffn_hidden_size"], vocab_size=model["vocab_size"], dtype_bytes=dtype_bytes)
    options = AnalyticOptions(zero_stage="world", num_ranks=world)
    return AnalyticModel(spec, hardware_preset("h100-80g"), options).analyze(layout).static_bytes


def memory_bound(engine: Engine, layout: Layout, tp_rank: int) -> dict[str, int]:
    """What a rank may hold: 1/world of the fp32 master + gradient + AdamW state, and its compute shard.

    Chunks are padded to ``world`` equal pieces (under ``world`` extra elements per
    parameter) and AdamW keeps a 4-byte ``step`` per parameter; the compute weights are
    fp32 here (no autocast), with fp32 gradient accumulators of the same shape: exactly
    8 bytes per element of the layout's shard.
    """
    slots = engine.state.layout.slots
    padded = sum(s.chunk for s in slots)  # elements per rank, padding included
    shard = sum(s.numel // (layout.tp if s.split_dim is not None else 1) for s in slots)
    return {
        "state": 16 * padded + 4 * len(slots),
        "compute": 8 * shard,
        "full_model": 16 * engine.num_parameters,
        "model": memory_model_bytes(MODEL, 4, engine.world_size, layout),
        "slack": (16 * engine.world_size + 4) * len(slots),  # chunk padding, AdamW's step
    }


def _expect_step_error(engine: Engine, plan: StepPlan, batch) -> str:
    try:
        engine.step(plan, batch)
    except StepError as e:
        return str(e)
    return "no error"


def _worker(rank: int, world: int, ckpt_dir: str) -> dict:
    by_name = {s.name: s for s in candidates()}
    out: dict = {"losses": [], "rank_seconds": [], "snapshots": {}, "grads": [], "errors": {}, "memory": []}

    # more pipeline stages than blocks is refused at construction, on every rank, before any group exists
    try:
        Engine([Strategy.homogeneous(Layout(1, 1, 4), world)], ModelConfig(**MODEL), make_optimizer)
    except ValueError as e:
        out["errors"]["pp"] = str(e)

    engine = Engine(candidates(), make_model, make_optimizer, config=EngineConfig(token_capacity=CAPACITY))
    out["groups_created"] = engine.groups_created
    out["group_timeouts_s"] = engine.group_timeouts_s
    late_groups: list = []
    real_new_group = torch.distributed.new_group

    def spy(*args, **kwargs):
        late_groups.append(args)
        return real_new_group(*args, **kwargs)

    torch.distributed.new_group = spy
    try:
        engine.save_checkpoint(f"{ckpt_dir}/step0")
        for step, name in enumerate(SCHEDULE):
            seqs = global_batch(step)
            plan = make_plan(step, by_name[name], seqs, IDLE.get(step))
            mbs = rank_batches(plan, rank, seqs)
            if step == 1:
                out["errors"].update(_bad_steps(engine, rank, seqs, mbs, plan))
            glt = loss_tokens(seqs)
            batch = mbs if step == 2 else SimpleNamespace(micro_batches=mbs, global_loss_tokens=glt, plan=plan)
            result = engine.step(plan, batch)
            out["losses"].append(result.loss)
            out["rank_seconds"].append(result.rank_seconds)
            out["grads"].append(flat(engine.full_gradients()))  # the reduce-scattered global gradient
            view = engine.view(name)
            out["memory"].append((dict(result.resident_bytes), memory_bound(engine, view.layout, view.context.tp_rank)))
            if step + 1 in (3, len(SCHEDULE)):
                out["snapshots"][step + 1] = flat(engine.full_parameters())
            if step + 1 == 3:
                engine.save_checkpoint(f"{ckpt_dir}/step3")
    finally:
        torch.distributed.new_group = real_new_group
    out["late_groups"] = len(late_groups)
    return out


def _bad_steps(engine: Engine, rank: int, seqs, mbs, plan: StepPlan) -> dict[str, str]:
    """Faulty plans and batches; each must raise StepError on every rank and change nothing."""
    errors = {}
    glt = loss_tokens(seqs)
    unknown = make_plan(plan.step, Strategy.homogeneous(Layout(4), WORLD), seqs)
    errors["unknown"] = _expect_step_error(engine, unknown, mbs)

    moved = Strategy("tp2x1+tp1x2", (
        Strategy.homogeneous(TP2, WORLD).replicas[1],  # tp2 on ranks (2, 3) instead of (0, 1)
        *Strategy.homogeneous(TP1, WORLD).replicas[:2],
    ))
    errors["ranks"] = _expect_step_error(engine, make_plan(plan.step, moved, seqs), mbs)

    # three 30-token sequences in one micro-batch of rank 1: 90 tokens, above tp1's 64
    long = [np.arange(30) % 128] * 3 + seqs[3:]
    over = plan_from(plan.step, Strategy.homogeneous(TP1, WORLD), long,
                     [[[3, 4], [5]], [[0, 1, 2]], [[6, 7]], [[8, 9]]])
    errors["capacity"] = _expect_step_error(engine, over, rank_batches(over, rank, long))

    # tp peers given different rows: the replica's fingerprints differ
    tp2 = make_plan(plan.step, Strategy.homogeneous(TP2, WORLD), seqs)
    bad = rank_batches(tp2, rank, seqs)
    if rank == 1:
        bad[0]["input_ids"] = (bad[0]["input_ids"] + 1) % 128
    errors["peers"] = _expect_step_error(engine, tp2, bad)

    errors["loss_tokens"] = _expect_step_error(
        engine, plan, SimpleNamespace(micro_batches=[dict(mb, global_loss_tokens=glt + 1) for mb in mbs],
                                      global_loss_tokens=glt + 1))
    return errors


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


RESUME_SCHEDULE = ["tp2x1", "tp1cp2x1", "tp1x2"]
"""Strategies of steps 3, 4, 5 in the 2-process job that resumes from the step-3 checkpoint."""


def _resume_worker(rank: int, world: int, ckpt_dir: str) -> dict:
    strategies = [Strategy.homogeneous(TP1, world), Strategy.homogeneous(TP2, world), Strategy.homogeneous(CP2, world)]
    by_name = {s.name: s for s in strategies}
    # another initialisation than the saved run's: loading must overwrite every value
    engine = Engine(strategies, ModelConfig(**MODEL), make_optimizer,
                    config=EngineConfig(token_capacity=CAPACITY, seed=123))
    out: dict = {"initial": flat(engine.full_parameters())}
    engine.load_checkpoint(f"{ckpt_dir}/step0")
    out["loaded0"] = flat(engine.full_parameters())
    engine.load_checkpoint(f"{ckpt_dir}/step3")
    out["loaded3"] = flat(engine.full_parameters())
    out["chunk"] = sum(p.numel() for p in engine.state.parameters())
    for step, name in zip(range(3, 6), RESUME_SCHEDULE):
        seqs = global_batch(step)
        plan = make_plan(step, by_name[name], seqs)
        engine.step(plan, rank_batches(plan, rank, seqs))
    out["final"] = flat(engine.full_parameters())
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    torch.set_num_threads(1)
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    main = run_local(_worker, WORLD, (ckpt,), timeout_s=150, collective_timeout_s=30)
    resumed = run_local(_resume_worker, 2, (ckpt,), timeout_s=120, collective_timeout_s=30)
    return main, resumed


@pytest.fixture(scope="module")
def run(runs) -> list[dict]:
    return runs[0]


@pytest.fixture(scope="module")
def reference() -> tuple[dict[int, torch.Tensor], list[float], list[torch.Tensor]]:
    return _reference()


def test_gradients_equal_single_device(run, reference):
    _, _, want = reference
    for step, g in enumerate(want):
        for rank, out in enumerate(run):
            # fp32 partial sums over tp/cp shards add in a different order than one device:
            # ~1e-6 of the largest gradient is rounding (BLAS-path dependent); a wrong
            # gradient is off by O(1) of it.
            torch.testing.assert_close(out["grads"][step], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()),
                                       msg=lambda m, r=rank, s=step: f"rank {r} step {s} ({SCHEDULE[s]}): {m}")


def test_parameters_equal_single_device_adamw(run, reference):
    want, _, _ = reference
    for n_steps in (3, len(SCHEDULE)):
        for rank, out in enumerate(run):
            got = out["snapshots"][n_steps]
            torch.testing.assert_close(got, want[n_steps], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, r=rank, n=n_steps: f"rank {r} after {n} steps: {m}")
        # the training actually moved the parameters (the comparison is not vacuous)
        assert (want[n_steps] - flat_params(make_model())).abs().max() > 1e-3


def test_resident_bytes_are_a_world_share_of_the_state_plus_the_compute_shard(run):
    for out in run:
        for step, (held, bound) in enumerate(out["memory"]):
            state = held["master"] + held["grad"] + held["optimizer"]
            compute = held["compute_weights"] + held["compute_grads"]
            where = f"step {step} ({SCHEDULE[step]}): {held} vs {bound}"
            assert 0 < state <= bound["state"], where
            assert compute == bound["compute"], where
            assert state + compute < bound["full_model"], where  # what every rank held before sharding
            # balancer's memory model of this layout (zero_stage="world") is what the rank holds, to padding
            assert 0 <= state + compute - bound["model"] <= bound["slack"], where
    # the state is a quarter of the replicated one, to padding: 16 bytes / 4 ranks per parameter
    held = run[0]["memory"][-1][0]
    assert held["master"] + held["grad"] + held["optimizer"] < 0.27 * run[0]["memory"][-1][1]["full_model"]


def test_checkpoint_loads_at_another_world_size_and_training_resumes_exactly(runs, reference):
    main, resumed = runs
    want, _, _ = reference
    initial = flat_params(make_model())
    for out in resumed:
        assert not torch.equal(out["initial"], initial)  # the 2-rank job started from other values
        assert torch.equal(out["loaded0"], initial)
        assert torch.equal(out["loaded3"], main[0]["snapshots"][3])
        # three more AdamW steps on 2 ranks (restored moments and step counts) = the reference's steps 4–6
        torch.testing.assert_close(out["final"], want[len(SCHEDULE)], rtol=1e-5, atol=1e-6)
    assert sum(out["chunk"] for out in resumed) == initial.numel()  # 2 ranks: every element owned once


def test_loss_is_global_token_mean_and_seconds_are_shared(run, reference):
    _, want, _ = reference
    for out in run:
        np.testing.assert_allclose(out["losses"], want, rtol=1e-5)
        assert out["rank_seconds"] == run[0]["rank_seconds"]
        assert all(len(s) == WORLD and min(s) > 0 for s in out["rank_seconds"])


def test_no_process_group_after_startup(run):
    for out in run:
        assert out["late_groups"] == 0
        # tp (0,1) (2,3); cp (0,2) (1,3) of tp2cp2; cp (0,1) of cp2+tp1x2; no gradient groups
        assert set(out["groups_created"]) == {(0, 1), (2, 3), (0, 2), (1, 3)}
        assert len(out["groups_created"]) == len(set(out["groups_created"]))
        # every group takes the job's timeout (run_local's init_process_group: 30 s), not torch's 30 minutes
        assert out["group_timeouts_s"] and set(out["group_timeouts_s"].values()) == {30.0}


@pytest.mark.parametrize(
    "case, text",
    [
        ("unknown", "names strategy 'tp4x1', which was not built"),
        ("ranks", "has replicas"),
        ("capacity", "rank 1: ValueError: rank 1 micro-batch 0 holds 90 tokens, above the capacity 64 of layout tp1"),
        ("peers", "hold different micro-batches"),
        ("loss_tokens", "but the ranks' labels hold"),
        ("pp", "strategy 'tp1pp4x1': pipeline degree pp=4 exceeds num_layers=2"),
    ],
)
def test_bad_input_fails_on_every_rank(run, case, text):
    for out in run:
        assert text in out["errors"][case], out["errors"][case]

