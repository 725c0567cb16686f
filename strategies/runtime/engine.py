"""The Engine: every candidate strategy built at start-up, one optimizer step per plan.

Start-up (identical on every rank):

1. build the master model (full, unsharded parameters) and broadcast rank 0's values;
2. build the optimizer over the master parameters (its state is full-shape too);
3. for each candidate strategy, in order: request its tp groups, cp groups and
   split-all-reduce buckets from one :class:`~.groups.GroupRegistry` (each distinct rank
   set becomes one process group, created in the same order on every rank), and keep
   this rank's view: its replica, (tp, cp) coordinates and :class:`~.grad_sync.GradientSync`;
4. freeze the registry — no process group is created after start-up.

``step(plan, step_batch)``:

1. **validate locally** (no collective): the plan names a built strategy with the same
   replicas, this rank's micro-batches match the plan and the packed format, fit the
   layout's token capacity; shift labels and cut this rank's cp rows;
2. **agree** — one all-gather of ``[error flag, loss tokens, plan digest, normaliser]``:
   if any rank failed, every rank raises :class:`StepError` (with every failing rank's
   message) before any other collective, so a bad plan or batch never hangs a job;
3. forward/backward of each micro-batch under the strategy's context, each loss
   ``Σ token cross-entropy / global_loss_tokens`` (timed: the rank's compute seconds);
4. gradient sync (split all-reduce + tp all-gather), optional clipping, optimizer step —
   the same full update on every rank;
5. one all-gather of ``[compute seconds, loss share]`` so every rank returns the same
   per-rank seconds (for ``Balancer.observe``) and the global mean loss.

Master parameters and optimizer state are replicated on every rank in one
strategy-independent (unsharded) layout. A strategy switch therefore moves no state at
all: the next step's forward just takes different ``narrow`` views of the same tensors.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from strategies.plan import StepPlan
from strategies.layout import Layout, Strategy

from .batch import LocalBatch, check_micro_batch, prepare_micro_batch
from .distributed import default_device
from .grad_sync import GradientSync, ShardedParam
from .groups import GroupRegistry, num_blocks_for, plan_buckets
from .model import GPT, ModelConfig
from .parallel import ParallelContext

__all__ = ["EngineConfig", "Engine", "StepError", "StepResult", "StrategyView"]


class StepError(RuntimeError):
    """A step was rejected before any compute; raised on every rank with the same message."""


@dataclass(kw_only=True)
class EngineConfig:
    """Run choices of the :class:`Engine` (runtime objects are constructor arguments)."""

    token_capacity: Mapping[str, int] | Callable[[Layout], int] | None = None
    """Most tokens one packed micro-batch may hold per layout: a mapping layout name →
    tokens, or a function such as ``CostModel.token_capacity``. ``None``: not checked."""
    max_grad_norm: float | None = None
    """Clip the global gradient L2 norm to this value before the optimizer step (None: off)."""
    autocast_dtype: torch.dtype | None = None
    """Run forward passes under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``
    on GPUs); ``None`` keeps fp32. Master parameters and optimizer state stay fp32."""
    group_timeout_s: float = 300.0
    """Timeout of every process group the engine creates, seconds."""
    broadcast_parameters: bool = True
    """Broadcast rank 0's initial parameters at start-up so all ranks start equal."""

    def __post_init__(self) -> None:
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"EngineConfig: max_grad_norm={self.max_grad_norm} must be > 0 or None")
        if not self.group_timeout_s > 0:
            raise ValueError(f"EngineConfig: group_timeout_s={self.group_timeout_s} must be > 0 seconds")
        if self.autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"EngineConfig: autocast_dtype={self.autocast_dtype} must be None, bfloat16 or float16")


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """What one optimizer step did. ``loss`` and ``rank_seconds`` are equal on every rank."""

    step: int
    strategy: str
    loss: float
    """Global token-mean next-token cross-entropy of the step (nats)."""
    rank_seconds: tuple[float, ...]
    """Measured forward+backward seconds of every rank (index = rank), for ``Balancer.observe``."""
    sync_seconds: float
    """This rank's gradient synchronisation time, seconds (includes waiting for slower ranks)."""
    optimizer_seconds: float
    """This rank's clipping + optimizer step time, seconds."""
    step_seconds: float
    """This rank's wall time of the whole ``Engine.step`` call, seconds."""
    tokens: int
    """Tokens of this rank's packed micro-batches (whole rows, before cp sharding)."""
    global_loss_tokens: int
    """The loss normaliser of the step (tokens)."""
    grad_norm: float | None
    """Global gradient L2 norm before clipping (only computed when clipping is on)."""


@dataclass(frozen=True, slots=True)
class StrategyView:
    """One built strategy as this rank sees it."""

    strategy: Strategy
    replica_index: int
    layout: Layout
    context: ParallelContext
    sync: GradientSync


def _digest60(plan: StepPlan) -> int:
    """First 60 bits of the plan digest (``sha256:<hex>``), to fit an int64 collective."""
    return int(plan.digest.split(":")[-1][:15], 16)


class Engine:
    """Run balanced steps of the reference GPT under per-step heterogeneous strategies.

    ``candidates``: every strategy a plan may name (pp = 1). ``model_builder``: a
    :class:`ModelConfig` or a callable returning a :class:`GPT` (the strategy-independent
    parameter set). ``optimizer_builder``: callable taking the master :class:`GPT` and
    returning its optimizer. ``torch.distributed`` must be initialised first
    (:func:`~.distributed.init_distributed`).
    """

    def __init__(
        self,
        candidates: Sequence[Strategy],
        model_builder: ModelConfig | Callable[[], GPT],
        optimizer_builder: Callable[[GPT], torch.optim.Optimizer],
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
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.candidates = self._check_candidates(candidates)
        if device is None:
            device = default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
        self.device = device

        self.model = self._build_model(model_builder)
        for s in self.candidates:
            for rep in s.replicas:
                self.model.config.check_tp(rep.layout.tp)
        self.optimizer = self._build_optimizer(optimizer_builder)

        self.num_blocks = num_blocks_for(self.candidates)
        """Blocks per sharded parameter (lcm of the candidates' tp degrees)."""
        splits = self.model.tp_split_dims()
        self._params = [ShardedParam(name, p, splits[name]) for name, p in self.model.named_parameters()]
        registry = GroupRegistry(self.world_size, timedelta(seconds=self.config.group_timeout_s))
        self._views = {s.name: self._build_view(s, registry) for s in self.candidates}
        registry.freeze()
        self.groups_created: tuple[tuple[int, ...], ...] = tuple(registry.created)
        """Rank sets of the process groups created at start-up, in creation order."""

    # -- start-up ---------------------------------------------------------------------------
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
            for rep in s.replicas:
                if rep.layout.pp > 1:
                    raise ValueError(
                        f"Engine: strategy {s.name!r} has a replica with layout {rep.layout.name} "
                        f"(pp={rep.layout.pp}); "
                        "this runtime has no pipeline parallelism — configure the planner's candidates with pp=1"
                    )
        return out

    def _build_model(self, model_builder: ModelConfig | Callable[[], GPT]) -> GPT:
        model = GPT(model_builder) if isinstance(model_builder, ModelConfig) else model_builder()
        if not isinstance(model, GPT):
            raise ValueError(f"Engine: model_builder returned {type(model).__name__}, expected strategies.runtime.GPT")
        model = model.to(self.device)
        if self.config.broadcast_parameters and self.world_size > 1:
            with torch.no_grad():
                for p in model.parameters():
                    dist.broadcast(p.data, src=0)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return model

    def _build_optimizer(self, optimizer_builder: Callable[[GPT], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        opt = optimizer_builder(self.model)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(
                f"Engine: optimizer_builder returned {type(opt).__name__}, expected a torch.optim.Optimizer"
            )
        master = {id(p) for p in self.model.parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in master:
                    raise ValueError("Engine: the optimizer holds a tensor that is not a master parameter of the model")
        return opt

    def _build_view(self, strategy: Strategy, registry: GroupRegistry) -> StrategyView:
        j = strategy.replica_index(self.rank)
        rep = strategy.replicas[j]
        tp_rank, cp_rank, _ = rep.coords(self.rank)
        tp_group = cp_group = None
        tp_members: tuple[int, ...] = (self.rank,)
        cp_members: tuple[int, ...] = (self.rank,)
        for other in strategy.replicas:  # every rank requests every group, in the same order
            for g in other.tp_groups():
                pg = registry.get(g)
                if self.rank in g:
                    tp_group, tp_members = pg, g
            for g in other.cp_groups():
                pg = registry.get(g)
                if self.rank in g:
                    cp_group, cp_members = pg, g
        buckets = []
        for bucket in plan_buckets(strategy, self.num_blocks):
            pg = registry.get(bucket.ranks)
            if self.rank in bucket.ranks:
                buckets.append((bucket, pg))
        pc = ParallelContext(
            tp_size=rep.layout.tp, tp_rank=tp_rank, tp_group=tp_group,
            cp_size=rep.layout.cp, cp_rank=cp_rank, cp_group=cp_group,
            cp_order=tuple(rep.coords(m)[1] for m in sorted(cp_members)),
        )
        sync = GradientSync(
            self._params, buckets, self.num_blocks, rep.layout.tp, tp_rank, tp_group,
            tuple(rep.coords(m)[0] for m in sorted(tp_members)),
        )
        return StrategyView(strategy=strategy, replica_index=j, layout=rep.layout, context=pc, sync=sync)

    # -- lookup -----------------------------------------------------------------------------
    @property
    def strategy_names(self) -> list[str]:
        return [s.name for s in self.candidates]

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

    # -- one step ---------------------------------------------------------------------------
    def step(self, plan: StepPlan, step_batch: Any) -> StepResult:
        """Run this rank's micro-batches of ``plan``, sync gradients, step the optimizer.

        ``step_batch``: an object with ``.micro_batches`` (packed dicts, this rank's, in the
        plan's order) and ``.global_loss_tokens`` — or a plain list of packed dicts.
        Raises :class:`StepError` on every rank when any rank rejects the step.
        """
        t_start = time.perf_counter()
        error: str | None = None
        view: StrategyView | None = None
        local: list[LocalBatch] = []
        normaliser: int | None = None
        fingerprint = 0
        try:
            micro_batches, normaliser, batch_plan = _unpack(step_batch)
            view, local, normaliser, fingerprint = self._check(plan, micro_batches, normaliser, batch_plan)
        except Exception as e:  # noqa: BLE001 — every local failure must become an agreed failure
            error = f"{type(e).__name__}: {e}"
        contributes = view is not None and view.context.tp_rank == 0
        loss_tokens = sum(b.num_loss_tokens for b in local) if contributes else 0
        self._agree(plan, error, loss_tokens, normaliser or 0, fingerprint)
        assert view is not None and normaliser is not None

        loss_sum, compute_s = self._forward_backward(view.context, local, normaliser)
        t1 = time.perf_counter()
        view.sync()
        sync_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        grad_norm = None
        if self.config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm))
        self.optimizer.step()
        self._sync_device()
        opt_s = time.perf_counter() - t2
        rank_seconds, loss = self._report(compute_s, loss_sum / normaliser if contributes else 0.0 * loss_sum)
        return StepResult(
            step=plan.step,
            strategy=plan.strategy,
            loss=loss,
            rank_seconds=rank_seconds,
            sync_seconds=sync_s,
            optimizer_seconds=opt_s,
            step_seconds=time.perf_counter() - t_start,
            tokens=sum(b.num_tokens for b in local),
            global_loss_tokens=normaliser,
            grad_norm=grad_norm,
        )

    def _forward_backward(
        self, pc: ParallelContext, local: list[LocalBatch], normaliser: int
    ) -> tuple[torch.Tensor, float]:
        """Run every micro-batch; return the summed token loss (nats, fp64) and the compute seconds."""
        self._zero_grads()
        self._sync_device()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for batch in local:
            with self._autocast():
                loss = self.model(batch, pc)
            (loss / normaliser).backward()  # Σ over ranks and micro-batches = the global token mean
            loss_sum += loss.detach().double()
        self._sync_device()
        return loss_sum, time.perf_counter() - t0

    def _report(self, compute_s: float, loss_share: torch.Tensor) -> tuple[tuple[float, ...], float]:
        """All-gather ``[compute seconds, loss share]``: every rank's seconds and the global loss."""
        mine = torch.stack([torch.tensor(compute_s, dtype=torch.float64, device=self.device), loss_share])
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        table = torch.stack(every).cpu()  # (world, 2)
        return tuple(float(x) for x in table[:, 0]), float(table[:, 1].sum())

    # -- helpers ----------------------------------------------------------------------------
    def _check(
        self, plan: StepPlan, micro_batches: list[Any], normaliser: int | None, batch_plan: StepPlan | None
    ) -> tuple[StrategyView, list[LocalBatch], int, int]:
        """Local validation and preparation of one step; raises ``ValueError`` naming the problem.

        Returns the view, the prepared micro-batches, the loss normaliser and a 60-bit
        fingerprint of this rank's token rows (ranks of one replica must hold the same).
        """
        if not isinstance(plan, StepPlan):
            raise ValueError(f"plan is a {type(plan).__name__}, expected balancer.plan.StepPlan")
        if plan.strategy not in self._views:
            raise ValueError(
                f"plan for step {plan.step} names strategy {plan.strategy!r}, which was not built; "
                f"built: {self.strategy_names}. Pass every strategy the planner may pick as a candidate"
            )
        view = self._views[plan.strategy]
        built = [(r.layout, r.ranks) for r in view.strategy.replicas]
        planned = [(r.layout, r.ranks) for r in plan.replicas]
        if built != planned:
            raise ValueError(
                f"plan for step {plan.step}: strategy {plan.strategy!r} has replicas "
                f"{[(lay.name, list(rk)) for lay, rk in planned]} but the built one has "
                f"{[(lay.name, list(rk)) for lay, rk in built]}; "
                "plan with the same candidate list the engine was built with"
            )
        if batch_plan is not None and batch_plan.digest != plan.digest:
            raise ValueError(
                f"step batch was built for plan {batch_plan.digest}, not for the plan passed ({plan.digest})"
            )
        rank_plan = plan.for_rank(self.rank)
        if len(micro_batches) != len(rank_plan.micro_batches):
            raise ValueError(
                f"rank {self.rank} got {len(micro_batches)} micro-batches but plan step {plan.step} gives it "
                f"{len(rank_plan.micro_batches)}; pass the micro-batches of plan.for_rank({self.rank})"
            )
        capacity = self.token_capacity(view.layout)
        vocab = self.model.config.vocab_size
        checked = [check_micro_batch(mb, k, vocab) for k, mb in enumerate(micro_batches)]
        for k, (mb, ids) in enumerate(zip(checked, rank_plan.micro_batches)):
            if mb.sample_ids is not None and mb.sample_ids.tolist() != list(ids):
                raise ValueError(
                    f"rank {self.rank} micro-batch {k} holds samples {mb.sample_ids.tolist()[:8]} but the plan "
                    f"says {list(ids)[:8]}; batches and plan are out of step"
                )
            if capacity is not None and mb.num_tokens > capacity:
                raise ValueError(
                    f"rank {self.rank} micro-batch {k} holds {mb.num_tokens} tokens, above the capacity {capacity} "
                    f"of layout {view.layout.name}; re-plan with the engine's token capacities"
                )
            if mb.global_loss_tokens is not None:
                if normaliser is None:
                    normaliser = mb.global_loss_tokens
                elif mb.global_loss_tokens != normaliser:
                    raise ValueError(
                        f"micro-batch {k} says global_loss_tokens={mb.global_loss_tokens} "
                        f"but the step batch says {normaliser}"
                    )
        if normaliser is None:
            normaliser = int(plan.global_loss_tokens)
        if normaliser < 1:
            raise ValueError(f"global_loss_tokens={normaliser}: the step has no loss tokens to average over")
        local = [prepare_micro_batch(mb, view.context, self.device) for mb in checked]
        h = hashlib.sha256(str(len(checked)).encode())
        for mb in checked:
            h.update(mb.seq_lens.tobytes())
            h.update(mb.input_ids.tobytes())
        return view, local, int(normaliser), int(h.hexdigest()[:15], 16)

    def _agree(self, plan: StepPlan, error: str | None, loss_tokens: int, normaliser: int, fingerprint: int) -> None:
        """One all-gather; every rank raises :class:`StepError` if any rank failed or they disagree."""
        digest = _digest60(plan) if isinstance(plan, StepPlan) else 0
        mine = torch.tensor(
            [int(error is not None), loss_tokens, digest, normaliser, fingerprint],
            dtype=torch.int64,
            device=self.device,
        )
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        table = torch.stack(every).cpu()  # (world, 5)
        step = getattr(plan, "step", "?")
        if bool(table[:, 0].any()):
            messages: list[str | None] = [None] * self.world_size
            dist.all_gather_object(messages, error)
            failed = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
            raise StepError(f"step {step} rejected on every rank — {failed}")
        if bool((table[:, 2] != table[0, 2]).any()):
            raise StepError(
                f"step {step}: ranks hold different plans (digest prefixes {table[:, 2].tolist()}); "
                "every rank must derive or receive the same StepPlan"
            )
        if bool((table[:, 3] != table[0, 3]).any()):
            raise StepError(f"step {step}: ranks disagree on global_loss_tokens {table[:, 3].tolist()}")
        for j, rep in enumerate(plan.replicas):
            prints = {int(table[r, 4]) for r in rep.ranks}
            if len(prints) > 1:
                raise StepError(
                    f"step {step}: the ranks {list(rep.ranks)} of replica {j} hold different micro-batches; "
                    "every rank of a replica must be given the same packed rows"
                )
        total = int(table[:, 1].sum())
        if total != normaliser:
            raise StepError(
                f"step {step}: global_loss_tokens={normaliser} but the ranks' labels hold {total} loss tokens; "
                "the collator's count and the labels disagree"
            )

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.config.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.config.autocast_dtype)

    def _zero_grads(self) -> None:
        for p in self.model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _unpack(step_batch: Any) -> tuple[list[Any], int | None, StepPlan | None]:
    if isinstance(step_batch, (list, tuple)):
        return list(step_batch), None, None
    if not hasattr(step_batch, "micro_batches"):
        return [step_batch], None, None  # the local check reports the wrong type
    glt = getattr(step_batch, "global_loss_tokens", None)
    plan = getattr(step_batch, "plan", None)
    if not isinstance(plan, StepPlan):
        plan = None
    return list(step_batch.micro_batches), None if glt is None else int(glt), plan
