"""Pipeline parallelism: the stage split, the 1F1B schedule, and the activation exchange.

**Stage split** (:func:`split_layers`). A replica of layout ``tp·cp·pp`` cuts the
transformer blocks into ``pp`` contiguous stages of at least one block; the first stage
also runs the token embedding, the last the final norm, the LM head and the loss. The
planner prices one micro-batch of a ``pp`` layout as the time of one stage and assumes
equal stages, so the split evens out the stages' *work*, not their block counts: the LM
head and loss count as :func:`head_blocks` blocks (FLOPs per token against a block's, at
a representative sequence length, on one tp rank — the head is split over tp like the blocks),
the embedding lookup as nothing, and :func:`strategies.stages.split_stages` picks the
contiguous split whose slowest stage is the fastest. For Llama-7B at tp1 the head is
0.62 of a block, which no whole block can balance (pp2: 16 | 16 blocks), and the same at
any tp (both divide by tp). The split is a pure function of the model's
shape and the layout, so every rank derives the same one. Inside a stage the ranks are an
ordinary ``tp·cp`` group: stage ``p`` of the replica holds the ranks with pipeline
coordinate ``p`` (:meth:`strategies.layout.Replica.coords`).

**Schedule** (:func:`one_f_one_b`). Non-interleaved 1F1B (PipeDream-flush, as in
Megatron-LM) over the plan's ``v`` micro-batches, in the plan's order: stage ``p`` runs
``min(pp − p − 1, v)`` warm-up forwards, then alternates one forward and one backward,
then drains the remaining backwards. It holds at most ``pp − p`` micro-batches'
activations at once (GPipe would hold ``v``). Forwards and backwards each visit the
micro-batches in order, so every stage accumulates the same gradients as one device.
The schedule is data — a list of :class:`Compute` and :class:`Exchange` ops — so tests
check its invariants and that no stage waits forever, whatever ``pp`` and ``v``.

**Variable shapes without a shape message.** The micro-batches are packed rows of
different lengths, so activation shapes change every micro-batch. Every rank of a
replica — every stage — holds the same packed rows (the step's agreement compares their
fingerprints before any compute, :mod:`~.validate`), so a stage knows the shape of what
it receives, ``(rows of its cp chunk, hidden)``, from its own copy of the micro-batch:
no shape travels and no extra round trip is paid. An empty micro-batch (an idle
replica's ``[]``, or a cp rank whose chunks are empty) sends nothing; both sides know.

**Exchange.** Activations go forward and their gradients backward between the ranks of
adjacent stages with the same ``(tp, cp)`` coordinates, over a two-rank process group
per stage boundary created at start-up (:func:`build_stage`). Each :class:`Exchange` is
one ``batch_isend_irecv`` (paired send and receive posted together, as NCCL needs to
avoid a send/send deadlock), waited on before the next op. Activations travel in the
compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from strategies.layout import Layout, Replica, Strategy
from strategies.stages import (
    ACT,
    FORWARD,
    GRAD,
    P2P,
    SEND,
    Compute,
    Exchange,
    lm_head_blocks,
    one_f_one_b,
    split_stages,
    stage_costs,
)

from .batch import LocalBatch
from .model import GPT, ModelConfig
from .parallel import ParallelContext

__all__ = [
    "P2P",
    "Compute",
    "Exchange",
    "PipelineStage",
    "StageSpec",
    "build_stage",
    "head_blocks",
    "one_f_one_b",
    "run_pipeline",
    "split_layers",
    "stage_forward",
    "stage_units",
]

FIRST_STAGE_UNITS = ("embed",)
"""Parameter units (:func:`~.state.unit_name`) the first stage computes besides its blocks."""
LAST_STAGE_UNITS = ("final_norm", "lm_head")
"""Parameter units the last stage computes besides its blocks."""


# -- the stage split ------------------------------------------------------------------------------
def split_layers(config: ModelConfig, layout: Layout) -> list[range]:
    """Blocks of each of ``layout.pp`` stages of ``config``'s model: contiguous, the slowest
    stage as fast as it can be, the LM head and the loss counted on the last stage
    (:func:`strategies.stages.split_stages` with :func:`head_blocks`). A pure function of the
    model's shape and the layout, so every rank derives the same split."""
    return split_stages(config.num_layers, layout.pp, last_extra=head_blocks(config, layout.tp))


def head_blocks(config: ModelConfig, tp: int = 1) -> float:
    """The last stage's LM head and loss, in blocks of this model on one rank of ``tp`` (the
    head split by vocabulary, the blocks by heads and columns): :func:`strategies.stages.lm_head_blocks`."""
    return lm_head_blocks(hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
                          num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                          vocab_size=config.vocab_size, tp=tp)


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What one pipeline stage computes (no process groups: also usable on one process)."""

    pp_size: int
    """Pipeline degree of the replica."""
    pp_rank: int
    """This stage's index, ``0 .. pp_size-1``."""
    layers: range
    """Transformer blocks of this stage."""

    @classmethod
    def of(cls, config: ModelConfig, layout: Layout, pp_rank: int) -> StageSpec:
        """Stage ``pp_rank`` of a replica of ``layout`` running ``config``'s model."""
        if not 0 <= pp_rank < layout.pp:
            raise ValueError(f"StageSpec: pp_rank={pp_rank} outside 0..{layout.pp - 1}")
        return cls(layout.pp, pp_rank, split_layers(config, layout)[pp_rank])

    @classmethod
    def busiest(cls, config: ModelConfig, layout: Layout) -> StageSpec:
        """The stage with the most work (by :func:`head_blocks`; the first of equals): the one
        a fitted cost model of a pp layout should be fitted on."""
        stages = split_layers(config, layout)
        costs = stage_costs(stages, last_extra=head_blocks(config, layout.tp))
        return cls.of(config, layout, costs.index(max(costs)))

    @property
    def first(self) -> bool:
        return self.pp_rank == 0

    @property
    def last(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def stage_units(unit_names: Sequence[str], spec: StageSpec) -> frozenset[int]:
    """Indices of the parameter units (``layers.<i>``, ``embed``, ...) that ``spec`` computes with."""
    out = set()
    for j, name in enumerate(unit_names):
        if name.startswith("layers."):
            mine = int(name.split(".")[1]) in spec.layers
        elif name in FIRST_STAGE_UNITS:
            mine = spec.first
        elif name in LAST_STAGE_UNITS:
            mine = spec.last
        else:
            raise ValueError(
                f"parameter unit {name!r} belongs to no pipeline stage; the stages know layers.<i>, "
                f"{', '.join(FIRST_STAGE_UNITS + LAST_STAGE_UNITS)} (extend pipeline.FIRST/LAST_STAGE_UNITS)"
            )
        if mine:
            out.add(j)
    return frozenset(out)


def stage_forward(model: GPT, spec: StageSpec, batch: LocalBatch, pc: ParallelContext,
                  x: torch.Tensor | None) -> torch.Tensor:
    """One stage's forward: the residual stream (T_local, hidden) it passes on, or on the
    last stage the summed token cross-entropy (nats). ``x``: the previous stage's output
    (``None`` on the first stage, which embeds the tokens)."""
    if spec.first:
        x = model.embed_tokens(batch, pc)
    assert x is not None, "a stage after the first needs the previous stage's activations"
    x = model.run_layers(x, batch, pc, spec.layers)
    return model.head_loss(x, batch, pc) if spec.last else x


# -- one rank's stage, with its peers ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PipelineStage:
    """This rank's stage of a pipeline replica and the process groups to its neighbours."""

    spec: StageSpec
    units: frozenset[int]
    """Parameter units (indices into :attr:`~.state.ShardLayout.units`) this stage computes with."""
    prev_rank: int | None
    """Global rank of the previous stage at this rank's (tp, cp) coordinates (None: first stage)."""
    next_rank: int | None
    prev_group: dist.ProcessGroup | None
    next_group: dist.ProcessGroup | None


def build_stage(strategy: Strategy, rank: int, get_group: Callable[[Sequence[int]], Any],
                config: ModelConfig, unit_names: Sequence[str]) -> PipelineStage | None:
    """Request the stage-boundary groups of every pipeline replica of ``strategy`` (in the same
    order on every rank, as ``new_group`` needs) and return this rank's stage (None: pp = 1)."""
    mine: PipelineStage | None = None
    for rep in strategy.replicas:
        if rep.layout.pp == 1:
            continue
        split_layers(config, rep.layout)  # ValueError on every rank when pp > num_layers
        for chain in rep.pp_groups():
            groups = [get_group(pair) for pair in pairwise(chain)]
            if rank in chain:
                mine = _stage_of(rep, rank, chain, groups, config, unit_names)
    return mine


def _stage_of(rep: Replica, rank: int, chain: tuple[int, ...], groups: list[Any], config: ModelConfig,
              unit_names: Sequence[str]) -> PipelineStage:
    p = rep.coords(rank)[2]
    spec = StageSpec.of(config, rep.layout, p)
    return PipelineStage(
        spec=spec, units=stage_units(unit_names, spec),
        prev_rank=None if spec.first else chain[p - 1], next_rank=None if spec.last else chain[p + 1],
        prev_group=None if spec.first else groups[p - 1], next_group=None if spec.last else groups[p],
    )


# -- running the schedule ---------------------------------------------------------------------------
def run_pipeline(
    model: GPT,
    stage: PipelineStage,
    pc: ParallelContext,
    batches: Sequence[LocalBatch],
    normaliser: int,
    *,
    act_dtype: torch.dtype,
    autocast: Callable[[], Any],
) -> torch.Tensor:
    """Forward and backward of every micro-batch through this rank's stage, 1F1B.

    Gradients accumulate into the model's parameters (each micro-batch's loss divided by
    ``normaliser``, as without pipelines). Returns the summed token loss (nats, fp64) —
    non-zero only on the last stage, which computes it.
    """
    return _Run(model, stage, pc, batches, normaliser, act_dtype, autocast).run()


class _Run:
    """The state of one step on one stage: activations in flight, and what waits to be sent."""

    def __init__(self, model: GPT, stage: PipelineStage, pc: ParallelContext, batches: Sequence[LocalBatch],
                 normaliser: int, act_dtype: torch.dtype, autocast: Callable[[], Any]) -> None:
        self.model, self.stage, self.pc, self.batches = model, stage, pc, batches
        self.normaliser, self.act_dtype, self.autocast = normaliser, act_dtype, autocast
        # the model's device, not the batches': a replica may have no micro-batch at all, and
        # the returned loss must still live where the engine's other tensors do (CUDA)
        self.device = next(model.parameters()).device
        self.inputs: dict[int, torch.Tensor] = {}
        """Received activations (leaves that collect their gradient) of micro-batches in flight."""
        self.outputs: dict[int, torch.Tensor] = {}
        """Stage outputs (activation, or the scaled loss on the last stage) awaiting their backward."""
        self.grads: dict[int, torch.Tensor] = {}
        """Received gradients of this stage's outputs."""
        self.outbox: dict[tuple[str, int], torch.Tensor] = {}
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def run(self) -> torch.Tensor:
        spec = self.stage.spec
        for op in one_f_one_b(spec.pp_size, spec.pp_rank, len(self.batches)):
            if isinstance(op, Exchange):
                self._exchange(op)
            elif op.kind == FORWARD:
                self._forward(op.micro_batch)
            else:
                self._backward(op.micro_batch)
        assert not (self.inputs or self.outputs or self.grads or self.outbox), "1F1B left work behind"
        return self.loss_sum

    def _shape(self, k: int) -> tuple[int, int]:
        """Activation shape of micro-batch ``k``: this cp rank's rows × hidden (known on both sides)."""
        return (int(self.batches[k].input_ids.shape[0]), self.model.config.hidden_size)

    def _forward(self, k: int) -> None:
        spec = self.stage.spec
        with self.autocast():
            y = stage_forward(self.model, spec, self.batches[k], self.pc, None if spec.first else self.inputs[k])
        if spec.last:
            self.loss_sum += y.detach().double()
            self.outputs[k] = y / self.normaliser  # Σ over ranks and micro-batches = the global token mean
        else:
            self.outputs[k] = y
            self.outbox[(ACT, k)] = y.detach().to(self.act_dtype).contiguous()

    def _backward(self, k: int) -> None:
        y = self.outputs.pop(k)
        if self.stage.spec.last:
            y.backward()
        else:
            y.backward(self.grads.pop(k).to(y.dtype))
        if not self.stage.spec.first:
            x = self.inputs.pop(k)
            self.outbox[(GRAD, k)] = x.grad if x.grad is not None else torch.zeros_like(x)

    def _exchange(self, ex: Exchange) -> None:
        st = self.stage
        posted: list[dist.P2POp] = []
        received: list[tuple[P2P, torch.Tensor]] = []
        for op in ex.ops:
            peer, group = (st.next_rank, st.next_group) if op.peer_offset > 0 else (st.prev_rank, st.prev_group)
            if op.direction == SEND:
                t = self.outbox.pop((op.what, op.micro_batch))
                if t.numel():
                    posted.append(dist.P2POp(dist.isend, t, peer, group))
            else:
                t = torch.empty(self._shape(op.micro_batch), dtype=self.act_dtype, device=self.device)
                if t.numel():  # an empty activation is not sent: both sides know its shape
                    posted.append(dist.P2POp(dist.irecv, t, peer, group))
                received.append((op, t))
        if posted:
            for work in dist.batch_isend_irecv(posted):
                work.wait()
        for op, t in received:
            if op.what == ACT:
                self.inputs[op.micro_batch] = t.requires_grad_()
            else:
                self.grads[op.micro_batch] = t

