"""The real training run of ``hydraulis demo``: the reference GPT on N local CPU processes.

Imported only inside the processes that :func:`strategies.runtime.run_local` starts (and
by ``demo`` when it launches them), so torch stays out of ``import balancer``.

Per rank, :func:`train_rank`:

1. times the reference GPT's forward + backward at a few lengths up to the micro-batch
   capacity, in process CPU time (one torch thread per rank, so neither the other rank nor
   other processes on shared cores inflate it), and fits ``t(s) = a·s² + b·s + c`` for
   ``tp1`` on the ranks' mean (:meth:`CostModel.fit_layouts`); with two ranks or more it
   also times the busiest stage of a two-stage pipeline (the last: its blocks, the final
   norm and the LM head) and fits ``tp1pp2`` from it, the planner's model of a pipeline
   layout (one stage per micro-batch, stages assumed equal); every rank gets the same model;
2. generates the candidates from the real lengths (:func:`generate_candidates`, pipeline
   layouts included) and
   builds the :class:`Balancer`, the runtime :class:`Engine` and a
   :class:`BalancedDataLoader` over synthetic tokens with the real lengths;
3. optionally builds a second engine (same initial weights) fed by a baseline policy
   through a second loader over the *same* global batches, and alternates the two runs
   step by step so both see the same machine load;
4. trains: ``engine.step(plan, batch)`` then ``balancer.observe(rank_seconds, plan)``;
   the engine times each rank's forward + backward in the training thread's CPU time
   (``EngineConfig(clock=time.thread_time)``: the background planning thread and the
   other rank on a shared core do not count), the demo the step's wall time.

Rank 0 returns the per-step records. Both runs train on identical global batches and the
runtime's gradients are exact, so their losses agree to rounding — the check that the
balancer changes the speed of a step, never its result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from balancer.baselines import make_baseline
from balancer.calibrate import measure
from balancer.cost import CostModel
from balancer.data import read_lengths
from balancer.pool import generate_candidates
from balancer.selector import Balancer, BalancerConfig
from dataloader import BalancedDataLoader
from strategies.layout import ClusterSpec, Layout, Strategy
from strategies.plan import StepPlan
from strategies.runtime import (
    GPT,
    SINGLE_DEVICE,
    Engine,
    EngineConfig,
    ModelConfig,
    StageSpec,
    check_micro_batch,
    prepare_micro_batch,
    stage_forward,
)

__all__ = ["TrainConfig", "PolicyPlanner", "PatternTokens", "train_rank"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The real run. Lengths and capacities in tokens."""

    data: str
    """Bundled length file (real document lengths)."""
    max_length: int
    """Cap on every sequence (the CPU cannot train 100K-token documents in seconds)."""
    tokens_per_step: int
    """Global batch budget."""
    steps: int
    """Optimizer steps per run."""
    micro_batch_tokens: int
    """Token capacity of one micro-batch (the CPU 'memory' limit of the demo)."""
    compare: str | None = "multipack"
    """Baseline policy trained side by side (``None``: balancer only)."""
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_hidden_size: int = 128
    lr: float = 3e-3
    seed: int = 0
    calibration_lengths: tuple[int, ...] = (128, 512, 1024, 2048)

    def __post_init__(self) -> None:
        if self.micro_batch_tokens < self.max_length:
            raise ValueError(
                f"TrainConfig: micro_batch_tokens={self.micro_batch_tokens} must hold max_length={self.max_length}"
            )
        if self.compare == "wlb_llm":
            raise ValueError("TrainConfig: wlb_llm moves sequences between steps, so its batches differ; compare another")

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                           num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                           ffn_hidden_size=self.ffn_hidden_size)


class PatternTokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Sample ``i``: ``lengths[i]`` tokens of an arithmetic progression modulo the vocabulary,
    ``(start + stride·t) mod V`` with a per-sample start and stride — learnable in context,
    so the loss falls within a few steps. Deterministic per ``(seed, i)``."""

    def __init__(self, lengths: np.ndarray, vocab_size: int, seed: int) -> None:
        self.lengths, self.vocab_size, self.seed = lengths, vocab_size, seed

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, int(i)))
        start, stride = rng.integers(0, self.vocab_size), rng.integers(1, 8)
        t = np.arange(int(self.lengths[i]), dtype=np.int64)
        return {"input_ids": (start + stride * t) % self.vocab_size}


class PolicyPlanner:
    """A baseline policy behind the planner interface the balanced loader uses
    (``plan``, ``prefetch``, ``max_sequence_length``, ``cluster_spec``)."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.cluster_spec = policy.cluster
        self.max_sequence_length = int(policy.max_length)

    def plan(self, lengths: np.ndarray, *, step: int = 0, sample_ids: np.ndarray | None = None,
             loss_tokens: np.ndarray | None = None) -> StepPlan:
        return self.policy.plan(lengths, step=step, sample_ids=sample_ids, loss_tokens=loss_tokens)

    def prefetch(self, batches: Iterator[tuple[Any, ...]], depth: int = 2) -> Iterator[StepPlan]:
        for item in batches:  # the loader already plans in a background thread
            step, lengths, ids = item[:3]
            loss = item[3] if len(item) > 3 else None
            yield self.plan(lengths, step=int(step), sample_ids=ids, loss_tokens=loss)


PIPELINE = Layout(1, 1, 2)
"""The pipeline layout the demo prices (its model has two blocks: one per stage)."""


def _time_forward_backward(cfg: TrainConfig, lengths: list[int], stage: StageSpec | None = None) -> np.ndarray:
    """Seconds of forward + backward of one sequence per length on this rank (min of runs):
    the whole model, or one pipeline ``stage`` of it."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config())
    device = torch.device("cpu")

    def step(mb: tuple[int, ...]) -> None:  # one sequence per micro-batch: (s,)
        (s,) = mb
        ids = torch.randint(0, cfg.vocab_size, (1, s))
        labels = ids.clone()
        labels[0, 0] = -100
        mb = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(s)[None],
              "cu_seqlens": torch.tensor([0, s], dtype=torch.int32)}
        batch = prepare_micro_batch(check_micro_batch(mb, 0, cfg.vocab_size), SINGLE_DEVICE, device)
        if stage is None:
            model(batch).backward()
        else:  # the stage's input stands in for the previous stage's activations
            x = None if stage.first else torch.randn(s, cfg.hidden_size, requires_grad=True)
            y = stage_forward(model, stage, batch, SINGLE_DEVICE, x)
            y.backward() if stage.last else y.backward(torch.ones_like(y))
        model.zero_grad(set_to_none=True)

    # CPU time of this process (one torch thread per rank): what the other rank or another
    # process does on a shared core cannot inflate it.
    return measure(step, lengths, device=device, warmup=1, repeats=2, clock="process", progress=False).seconds


def calibrate_cost_model(cfg: TrainConfig, world_size: int) -> CostModel:
    """``tp1`` (and ``tp1pp2``) coefficients from every rank's timings at once (their mean, so ranks agree)."""
    # Lengths up to the micro-batch capacity: the fit is then measured for every micro-batch
    # the planner may build (the loader warns about micro-batches beyond what was measured).
    lengths = sorted({min(s, cfg.micro_batch_tokens) for s in cfg.calibration_lengths})
    layouts = {Layout(1): None}
    if world_size >= PIPELINE.size and cfg.num_layers >= PIPELINE.pp:
        layouts[PIPELINE] = StageSpec.busiest(cfg.model_config(), PIPELINE)
    seconds = torch.tensor(np.stack([_time_forward_backward(cfg, lengths, spec) for spec in layouts.values()]),
                           dtype=torch.float64)
    dist.all_reduce(seconds)
    mean = (seconds / world_size).numpy()
    samples = {lay: (lengths, mean[k].tolist()) for k, lay in enumerate(layouts)}
    return CostModel.fit_layouts(samples, token_capacity=cfg.micro_batch_tokens)


def _engine(cfg: TrainConfig, candidates: list[Strategy], cost: CostModel) -> Engine:
    torch.manual_seed(cfg.seed)  # both runs start from the same weights
    return Engine(
        candidates, cfg.model_config(),
        lambda m: torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=0.0),
        # rank_seconds in CPU time of the training thread: ranks that share cores cannot
        # swap their measured order (a light rank preempted by a heavy one looks light), and
        # the loader's planning thread (rank 0 plans) does not count
        config=EngineConfig(token_capacity=cost.token_capacity, clock=time.thread_time), device=torch.device("cpu"),
    )


def _record(batch: Any, result: Any, wall_seconds: float) -> dict[str, Any]:
    secs = result.rank_seconds
    return {
        "step": int(batch.step),
        "strategy": batch.plan.strategy,
        "est_seconds": float(batch.plan.est_step_seconds),
        "compute_max": float(max(secs)),
        "compute_min": float(min(secs)),
        "step_seconds": float(wall_seconds),  # wall time of engine.step (the engine's clock is CPU time)
        "tokens": int(batch.plan.global_tokens),
        "sequences": int(batch.plan.global_sequences),
        "loss": float(result.loss),
    }


def train_rank(rank: int, world_size: int, cfg: TrainConfig) -> dict[str, Any] | None:
    """One rank of the demo's real run; rank 0 returns the records (see the module docstring)."""
    lengths = np.minimum(read_lengths(cfg.data), cfg.max_length)
    cluster = ClusterSpec(num_ranks=world_size, ranks_per_node=world_size)
    cost = calibrate_cost_model(cfg, world_size)
    pool = generate_candidates(lengths, cluster, cost, batch_tokens=cfg.tokens_per_step, num_candidates=4,
                               max_length=cfg.max_length, seed=cfg.seed, allow_pp=True, max_pp=PIPELINE.pp)
    candidates = list(pool.strategies)
    balancer = Balancer(cluster, candidates, cost, BalancerConfig(seed=cfg.seed))
    data = PatternTokens(lengths, cfg.vocab_size, cfg.seed)
    runs: dict[str, tuple[Engine, BalancedDataLoader, Any]] = {}
    loader = BalancedDataLoader(data, balancer=balancer, lengths=lengths, tokens_per_step=cfg.tokens_per_step,
                                seed=cfg.seed)
    runs["balancer"] = (_engine(cfg, candidates, cost), loader, balancer)
    if cfg.compare:
        static = Strategy.homogeneous(Layout(1), world_size)
        policy = make_baseline(cfg.compare, cluster, static, cost, seed=cfg.seed, max_length=cfg.max_length)
        base_loader = BalancedDataLoader(data, balancer=PolicyPlanner(policy), lengths=lengths,
                                         tokens_per_step=cfg.tokens_per_step, seed=cfg.seed)
        runs[cfg.compare] = (_engine(cfg, [static], cost), base_loader, None)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    iters = {name: iter(loader_) for name, (_, loader_, _) in runs.items()}
    for _ in range(cfg.steps):
        for name, (engine, _, observer) in runs.items():  # alternate: both runs see the same load
            batch = next(iters[name])
            t0 = time.perf_counter()
            result = engine.step(batch.plan, batch)
            wall = time.perf_counter() - t0
            # CPU-time rank seconds leave out pipeline bubbles, which a pipeline replica's estimate
            # holds: feed the straggler model only steps without pipeline replicas
            if observer is not None and all(r.layout.pp == 1 for r in batch.plan.replicas):
                observer.observe(result.rank_seconds, batch.plan)
            records[name].append(_record(batch, result, wall))
    for _, loader_, _ in runs.values():
        loader_.close()
    if rank != 0:
        return None
    c = cost.cost(Layout(1))
    return {
        "config": asdict(cfg),
        "world_size": world_size,
        "parameters": int(runs["balancer"][0].num_parameters),
        "cost_model": {"a": c.a, "b": c.b, "c": c.c, "token_capacity": c.token_capacity,
                       "r2": cost.fit_r2(Layout(1))},
        "candidates": [s.name for s in candidates],
        "runs": records,
    }
