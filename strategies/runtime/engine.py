"""The Engine: every candidate strategy built at start-up, one optimizer step per plan.

Start-up (identical on every rank):

1. build the model module and the sharded state (:mod:`~.state`): every rank keeps its
   ``≈ 1/world`` chunk of every parameter in fp32 — initialised from a seeded generator
   per parameter (a :class:`ModelConfig`; no rank ever holds the whole model) or cut from
   a built :class:`GPT` (rank 0's values); the module's own parameters become empty
   holders for the per-step compute weights;
2. build the optimizer over the chunks (its state is sharded with them);
3. choose the attention kernel for the device and compute dtype (:func:`strategies.kernels.choose_kernel`);
4. for each candidate strategy, in order: request its tp groups, cp groups and (pp > 1)
   the two-rank groups of its pipeline stage boundaries from one
   :class:`~.groups.GroupRegistry` (each distinct rank set becomes one process group,
   created in the same order on every rank) and keep this rank's view: its replica, its
   (tp, cp) coordinates and its pipeline stage (:mod:`~.pipeline`); then freeze the
   registry — no group is created later.

``step(plan, step_batch)``:

1. **validate locally, then agree** (:mod:`~.validate`): a bad plan or batch raises
   :class:`StepError` on every rank before any other collective;
2. **gather** the strategy's compute weights (this rank's tp shard, in the compute dtype)
   from the owners, unit by unit (``all_gather_into_tensor``);
3. forward/backward of each micro-batch under the strategy's context, each loss
   ``Σ token cross-entropy / global_loss_tokens`` (timed: the rank's compute seconds);
   gradients accumulate in fp32. A pipeline rank keeps only its stage's compute weights
   and runs the 1F1B schedule (:func:`~.pipeline.run_pipeline`);
4. **reduce-scatter** the gradients to the owners, unit by unit, releasing each unit's
   compute weights after it; optional clipping; the optimizer steps on the chunks;
5. one all-gather of ``[compute seconds, loss share]`` so every rank returns the same
   per-rank seconds (for ``Balancer.observe``) and the global mean loss.

The optimizer layout does not depend on the strategy, so a switch moves no state.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from strategies.collectives import group_timeout
from strategies.kernels import choose_kernel
from strategies.layout import Layout, Strategy
from strategies.plan import StepPlan

from .batch import LocalBatch
from .checkpoint import load_state, save_state
from .compute import ComputeWeights, build_model, storage_bytes
from .distributed import default_device
from .engine_types import EngineConfig, StepResult
from .groups import GroupRegistry
from .model import GPT, ModelConfig
from .parallel import ParallelContext
from .pipeline import PipelineStage, build_stage, run_pipeline, split_layers
from .state import ShardedState
from .validate import StepError, agree, check_step, unpack_step_batch

__all__ = ["Engine", "StepError", "StrategyView"]


@dataclass(frozen=True, slots=True)
class StrategyView:
    """One built strategy as this rank sees it."""

    strategy: Strategy
    replica_index: int
    layout: Layout
    context: ParallelContext
    stage: PipelineStage | None = None
    """This rank's pipeline stage (None: the replica has pp = 1)."""


class Engine:
    """Run balanced steps of the reference GPT under per-step heterogeneous strategies.

    ``candidates``: every strategy a plan may name. ``model_builder``: a
    :class:`ModelConfig` (initialised shard by shard, never materialised whole) or a
    callable returning a :class:`GPT` with initial values (materialised once, e.g. a
    pretrained model). ``optimizer_builder``: callable taking the sharded state (it has
    ``parameters()`` and ``named_parameters()``, yielding 1-D fp32 chunks) and returning
    its optimizer — e.g. ``lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4)``.
    ``torch.distributed`` must be initialised first (:func:`~.distributed.init_distributed`).
    """

    def __init__(
        self,
        candidates: Sequence[Strategy],
        model_builder: ModelConfig | Callable[[], GPT],
        optimizer_builder: Callable[[ShardedState], torch.optim.Optimizer],
        *,
        config: EngineConfig | None = None,
        device: torch.device | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised; call strategies.runtime.init_distributed() "
                "(or torch.distributed.init_process_group) before building the Engine"
            )
        self.config = config or EngineConfig()
        self._clock = self.config.clock
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.candidates = self._check_candidates(candidates)
        if device is None:
            device = default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
        self.device = device
        self.compute_dtype = self.config.autocast_dtype or torch.float32
        """dtype of the compute weights (fp32 master values cast once per step)."""

        self.model, self.state = build_model(
            model_builder, world_size=self.world_size, rank=self.rank, device=device,
            compute_dtype=self.compute_dtype, seed=self.config.seed,
            broadcast=self.config.broadcast_parameters,
            check_tp=sorted({rep.layout.tp for s in self.candidates for rep in s.replicas}),
        )
        for s in self.candidates:
            for rep in s.replicas:
                try:
                    split_layers(self.model.config, rep.layout)
                except ValueError as e:
                    raise ValueError(f"Engine: strategy {s.name!r}: {e}") from None
        self.attention_kernel = choose_kernel(self.config.attention, device, self.compute_dtype)
        """The attention kernel every forward of this engine uses."""
        self.model.attention_kernel = self.attention_kernel
        self.optimizer = self._build_optimizer(optimizer_builder)
        self.compute = ComputeWeights(self.model, self.state)

        registry = GroupRegistry(self.world_size, self._group_timeout())
        self._views = {s.name: self._build_view(s, registry) for s in self.candidates}
        registry.freeze()
        self.groups_created: tuple[tuple[int, ...], ...] = tuple(registry.created)
        """Rank sets of the process groups created at start-up, in creation order."""
        self.group_timeouts_s: dict[tuple[int, ...], float | None] = {
            ranks: None if (t := group_timeout(g)) is None else t.total_seconds()
            for ranks, g in zip(registry.created, registry.created_groups)
            if self.rank in ranks
        }
        """Collective timeout, seconds, of each created group this rank belongs to (the job's own unless configured)."""

    # -- start-up ---------------------------------------------------------------------------
    def _group_timeout(self) -> timedelta:
        if self.config.group_timeout_s is not None:
            return timedelta(seconds=self.config.group_timeout_s)
        return group_timeout(None) or timedelta(seconds=300)

    def _check_candidates(self, candidates: Sequence[Strategy]) -> tuple[Strategy, ...]:
        out = tuple(candidates)
        if not out:
            raise ValueError("Engine: no candidate strategies; pass at least one Strategy")
        names: set[str] = set()
        for s in out:
            if not isinstance(s, Strategy):
                raise ValueError(f"Engine: candidates must be Strategy objects, got {type(s).__name__}")
            if s.name in names:
                raise ValueError(f"Engine: two candidates are named {s.name!r}; strategy names must be unique")
            names.add(s.name)
            if s.num_ranks != self.world_size:
                raise ValueError(
                    f"Engine: strategy {s.name!r} covers {s.num_ranks} ranks but the job has "
                    f"{self.world_size}; build candidates for world size {self.world_size}"
                )
        return out

    def _build_optimizer(self, optimizer_builder: Callable[[ShardedState], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        opt = optimizer_builder(self.state)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(
                f"Engine: optimizer_builder returned {type(opt).__name__}, expected a torch.optim.Optimizer"
            )
        chunks = {id(p) for p in self.state.parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in chunks:
                    raise ValueError(
                        "Engine: the optimizer holds a tensor that is not a parameter chunk of the sharded state; "
                        "build it from the object optimizer_builder receives (m.parameters())"
                    )
        return opt

    def _build_view(self, strategy: Strategy, registry: GroupRegistry) -> StrategyView:
        j = strategy.replica_index(self.rank)
        rep = strategy.replicas[j]
        tp_rank, cp_rank, _ = rep.coords(self.rank)
        tp_group = cp_group = None
        cp_members: tuple[int, ...] = (self.rank,)
        for other in strategy.replicas:  # every rank requests every group, in the same order
            for g in other.tp_groups():
                pg = registry.get(g)
                if self.rank in g:
                    tp_group = pg
            for g in other.cp_groups():
                pg = registry.get(g)
                if self.rank in g:
                    cp_group, cp_members = pg, g
        pc = ParallelContext(
            tp_size=rep.layout.tp, tp_rank=tp_rank, tp_group=tp_group,
            cp_size=rep.layout.cp, cp_rank=cp_rank, cp_group=cp_group,
            cp_order=tuple(rep.coords(m)[1] for m in sorted(cp_members)),
        )
        stage = build_stage(strategy, self.rank, registry.get, self.model.config, self.state.layout.units)
        return StrategyView(strategy=strategy, replica_index=j, layout=rep.layout, context=pc, stage=stage)

    # -- lookup -----------------------------------------------------------------------------
    @property
    def strategy_names(self) -> list[str]:
        return [s.name for s in self.candidates]

    @property
    def num_parameters(self) -> int:
        """Parameters of the full model (elements)."""
        return self.state.layout.num_parameters

    def view(self, name: str) -> StrategyView:
        """This rank's view of the built strategy ``name``."""
        if name not in self._views:
            raise KeyError(f"strategy {name!r} was not built; built: {self.strategy_names}")
        return self._views[name]

    def token_capacity(self, layout: Layout) -> int | None:
        """Most tokens a packed micro-batch may hold on ``layout`` (``None``: not checked)."""
        cap = self.config.token_capacity
        if cap is None:
            return None
        if callable(cap):
            return int(cap(layout))
        if layout.name not in cap:
            raise ValueError(f"EngineConfig.token_capacity has no entry for layout {layout.name}; known: {sorted(cap)}")
        return int(cap[layout.name])

    # -- state ------------------------------------------------------------------------------
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter's full fp32 value on every rank (collective; for export and tests)."""
        return self.state.full("param")

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """The last step's global gradient, full, on every rank (collective; for tests)."""
        return self.state.full("grad")

    def save_checkpoint(self, path: str | Path) -> None:
        """Save the sharded master parameters and optimizer state with DCP (collective)."""
        save_state(self.state, self.optimizer, path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a checkpoint saved by :meth:`save_checkpoint` at any world size (collective)."""
        load_state(self.state, self.optimizer, path)

    # -- one step ---------------------------------------------------------------------------
    def step(self, plan: StepPlan, step_batch: Any) -> StepResult:
        """Run this rank's micro-batches of ``plan``, sync gradients, step the optimizer.

        ``step_batch``: an object with ``.micro_batches`` (packed dicts, this rank's, in the
        plan's order) and ``.global_loss_tokens`` — or a plain list of packed dicts.
        Raises :class:`StepError` on every rank when any rank rejects the step.
        """
        t_start = self._clock()
        error: str | None = None
        view: StrategyView | None = None
        local: list[LocalBatch] = []
        normaliser: int | None = None
        fingerprint = 0
        try:
            micro_batches, normaliser, batch_plan = unpack_step_batch(step_batch)
            built = {n: ([(r.layout, r.ranks) for r in v.strategy.replicas], v.context) for n, v in self._views.items()}
            local, normaliser, fingerprint = check_step(
                plan, micro_batches, normaliser, batch_plan, rank=self.rank, built=built,
                capacity=self.token_capacity, vocab_size=self.model.config.vocab_size, device=self.device,
            )
            view = self._views[plan.strategy]
        except Exception as e:  # noqa: BLE001 — every local failure must become an agreed failure
            error = f"{type(e).__name__}: {e}"
        # the loss is counted once per replica: tp rank 0, on the last pipeline stage
        contributes = view is not None and view.context.tp_rank == 0 and (view.stage is None or view.stage.spec.last)
        loss_tokens = sum(b.num_loss_tokens for b in local) if contributes else 0
        agree(plan, error, loss_tokens, normaliser or 0, fingerprint, world_size=self.world_size, device=self.device)
        assert view is not None and normaliser is not None

        t0 = self._clock()
        self.compute.install(view.context, None if view.stage is None else view.stage.units)
        self._sync_device()
        gather_s = self._clock() - t0
        loss_sum, compute_s = self._forward_backward(view, local, normaliser)
        resident = self._resident_bytes()
        t1 = self._clock()
        self.compute.reduce_scatter(view.context)
        self._sync_device()
        sync_s = self._clock() - t1
        t2 = self._clock()
        grad_norm = None
        if self.config.max_grad_norm is not None:
            grad_norm = self.state.grad_norm()
            self.state.scale_grads(min(1.0, self.config.max_grad_norm / (grad_norm + 1e-6)))
        self.optimizer.step()
        self._sync_device()
        opt_s = self._clock() - t2
        resident["optimizer"] = storage_bytes(t for st in self.optimizer.state.values() for t in st.values())
        rank_seconds, loss = self._report(compute_s, loss_sum / normaliser if contributes else 0.0 * loss_sum)
        return StepResult(
            step=plan.step,
            strategy=plan.strategy,
            loss=loss,
            rank_seconds=rank_seconds,
            gather_seconds=gather_s,
            sync_seconds=sync_s,
            optimizer_seconds=opt_s,
            step_seconds=self._clock() - t_start,
            tokens=sum(b.num_tokens for b in local),
            global_loss_tokens=normaliser,
            grad_norm=grad_norm,
            resident_bytes=resident,
        )

    def _forward_backward(
        self, view: StrategyView, local: list[LocalBatch], normaliser: int
    ) -> tuple[torch.Tensor, float]:
        """Run every micro-batch; return the summed token loss (nats, fp64) and the compute seconds."""
        pc = view.context
        self._sync_device()
        t0 = self._clock()
        if view.stage is not None:
            loss_sum = run_pipeline(self.model, view.stage, pc, local, normaliser,
                                    act_dtype=self.compute_dtype, autocast=self._autocast)
        else:
            loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
            for batch in local:
                with self._autocast():
                    loss = self.model(batch, pc)
                (loss / normaliser).backward()  # Σ over ranks and micro-batches = the global token mean
                loss_sum += loss.detach().double()
        self._sync_device()
        return loss_sum, self._clock() - t0

    def _resident_bytes(self) -> dict[str, int]:
        return {**self.state.nbytes(), **self.compute.nbytes()}

    def _report(self, compute_s: float, loss_share: torch.Tensor) -> tuple[tuple[float, ...], float]:
        """All-gather ``[compute seconds, loss share]``: every rank's seconds and the global loss."""
        mine = torch.stack([torch.tensor(compute_s, dtype=torch.float64, device=self.device), loss_share])
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        table = torch.stack(every).cpu()  # (world, 2)
        return tuple(float(x) for x in table[:, 0]), float(table[:, 1].sum())

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.config.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.config.autocast_dtype)

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
