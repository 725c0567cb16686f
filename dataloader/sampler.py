"""The distributed, deterministic, resumable balanced batch sampler.

One epoch, on every rank alike::

    order    = permutation of the kept samples from (seed, epoch)       (no shuffle: 0..n-1)
    batches  = consecutive runs of ``order``: ``sequences_per_step`` samples each, or
               greedily as many as fit in ``tokens_per_step`` tokens (at least one sample)
    plan_t   = Balancer.plan(lengths of batch t, step=global step t)
    rank r   → plan_t.for_rank(r).micro_batches  (sample ids, per micro-batch)

The global batch sequence depends only on (lengths, seed, epoch, budget, over-long
policy and its ``max_length``) — never on the world size — so a run can resume on a
different number of ranks and continue the epoch with no sample lost or repeated; only
the plans (which replica runs which sample) change.

Over-long samples (more tokens than ``max_length``, default ``balancer.max_sequence_length``)
follow ``overlong``:

* ``"error"`` (default): raise at construction, naming the sample, its length and the limit;
* ``"truncate"``: keep the first ``max_length`` tokens;
* ``"split"``: cut into pieces of at most ``max_length`` tokens that overlap by one token
  (piece ``j`` starts at ``j·(max_length−1)``), each packed as its own sequence: no
  attention crosses a piece boundary (later pieces lose the earlier context), but every
  next-token target of the sample is trained exactly once. Pieces after the first get
  ids ``len(dataset) + k`` in the plan (the batch's ``MicroBatchSpec`` maps them back);
* ``"drop"``: leave the sample out of every epoch.

Truncated, split and dropped samples are counted in :attr:`BalancedBatchSampler.stats`
and announced with one warning at construction — never silent.

The final batch of an epoch: with ``drop_last=False`` (default) it is trained as a
smaller step (loss normalisation uses its own ``global_loss_tokens``, so the gradient is
still an exact token mean). With ``drop_last=True`` it is skipped when partial — in
``sequences_per_step`` mode when it holds fewer samples, in ``tokens_per_step`` mode
always (it is the one batch the budget did not close); the skipped samples are counted
in ``stats.dropped_last_samples`` and are in the next epoch's shuffle as usual.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from strategies.plan import RankPlan, StepPlan

from .distributed import check_world, plan_group, rank_and_world, resolve_sync
from .epochs import epoch_batches, gather_batch
from .lengths import check_lengths
from .pieces import OVERLONG_POLICIES, Pieces, build_pieces, check_loss_tokens, describe_cuts
from .planning import PLAN_SYNC_MODES, PlanBatch, PlanStream
from .spec import MicroBatchSpec

__all__ = ["OVERLONG_POLICIES", "BalancedBatchSampler", "SamplerConfig", "SamplerStats", "SamplerStep", "balancer_state"]

_STATE_VERSION = 1
_LAST = object()
"""Sentinel: "the strategy of the last step yielded"."""


@dataclass(kw_only=True)
class SamplerConfig:
    """How global batches are formed and planned. Give exactly one of the two budgets."""

    tokens_per_step: int | None = None
    """Global batch budget in tokens (all ranks together); batches take samples until the next would exceed it."""
    sequences_per_step: int | None = None
    """Global batch size in samples (all ranks together)."""
    seed: int = 0
    """Seed of the per-epoch shuffle (the order of epoch ``e`` comes from ``(seed, e)``)."""
    shuffle: bool = True
    """Shuffle every epoch; ``False`` keeps dataset order."""
    overlong: str = "error"
    """Policy for samples above ``max_length`` tokens: ``error``, ``truncate``, ``split`` or ``drop``."""
    max_length: int | None = None
    """Over-long threshold in tokens; ``None`` = the balancer's ``max_sequence_length``."""
    drop_last: bool = False
    """Skip a partial final batch per epoch (counted in the stats); see the module docstring."""
    plan_ahead: int = 2
    """Steps planned in the background ahead of the consumer."""
    plan_sync: str = "auto"
    """``none``, ``verify`` (all-gather plan digests), ``broadcast`` (rank 0 plans), or ``auto``:
    ``broadcast`` under an initialised multi-rank torch.distributed, else ``none``."""

    def __post_init__(self) -> None:
        if (self.tokens_per_step is None) == (self.sequences_per_step is None):
            raise ValueError(
                "SamplerConfig: give exactly one of tokens_per_step (e.g. 1_048_576) or sequences_per_step (e.g. 512); "
                f"got tokens_per_step={self.tokens_per_step}, sequences_per_step={self.sequences_per_step}"
            )
        for name in ("tokens_per_step", "sequences_per_step", "max_length", "plan_ahead"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"SamplerConfig: {name}={v!r} must be a positive integer")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"SamplerConfig: overlong={self.overlong!r}; choose one of {list(OVERLONG_POLICIES)}")
        if self.plan_sync not in (*PLAN_SYNC_MODES, "auto"):
            raise ValueError(f"SamplerConfig: plan_sync={self.plan_sync!r}; choose one of {[*PLAN_SYNC_MODES, 'auto']}")
        if self.overlong == "split" and self.max_length == 1:
            raise ValueError("SamplerConfig: overlong='split' needs max_length >= 2 (pieces overlap by one token)")


@dataclass
class SamplerStats:
    """What the over-long policy and ``drop_last`` did (all counts in samples unless named tokens)."""

    num_samples: int = 0
    num_kept: int = 0
    dropped_overlong: int = 0
    dropped_overlong_ids: list[int] = field(default_factory=list)
    """First few dropped sample ids (at most 16)."""
    truncated: int = 0
    truncated_tokens: int = 0
    split: int = 0
    extra_pieces: int = 0
    dropped_last_samples: int = 0
    """Samples skipped by ``drop_last`` so far (summed over epochs iterated)."""


@dataclass(frozen=True, slots=True)
class SamplerStep:
    """One optimizer step for this rank: the plan and this rank's micro-batches."""

    step: int
    epoch: int
    step_in_epoch: int
    plan: StepPlan
    rank_plan: RankPlan
    micro_batches: tuple[MicroBatchSpec, ...]
    global_loss_tokens: int

    @property
    def sample_ids(self) -> list[list[int]]:
        """Dataset indices per micro-batch (a split sample's pieces show its own id)."""
        return [list(mb.sample_ids) for mb in self.micro_batches]


class BalancedBatchSampler:
    """Global batches → balanced plans → this rank's micro-batches, one step at a time.

    ``lengths``: tokens per sample (``int64[n]``, index = sample id). ``balancer``: a
    :class:`balancer.selector.Balancer` (or anything with ``plan``, ``prefetch`` and
    ``max_sequence_length``). ``loss_tokens``: loss-carrying tokens per sample (default
    ``lengths − 1``). ``piece_loss_tokens(sample_id, starts, ends) -> int64[k]`` counts
    loss tokens of truncated/split pieces when ``loss_tokens`` is custom. ``rank`` /
    ``world_size`` default to torch.distributed (else 0 / 1).

    Iterating yields one :class:`SamplerStep` per optimizer step. Each ``__iter__`` runs
    one epoch from the current position and then advances the epoch; a loaded state
    (:meth:`load_state_dict`) applies at the next ``__iter__``.
    """

    def __init__(
        self,
        lengths: np.ndarray | Sequence[int],
        balancer: Any,
        config: SamplerConfig,
        *,
        loss_tokens: np.ndarray | Sequence[int] | None = None,
        piece_loss_tokens: Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        process_group: Any = None,
    ) -> None:
        if not isinstance(config, SamplerConfig):
            raise ValueError(f"config must be a SamplerConfig, got {type(config).__name__}")
        self.config = config
        self.balancer = balancer
        self.lengths = check_lengths(lengths)
        n = self.lengths.size
        self.loss_tokens = self.lengths - 1 if loss_tokens is None else check_loss_tokens(loss_tokens, self.lengths)
        self._piece_loss_tokens = piece_loss_tokens
        self.rank, self.world_size = rank_and_world(rank, world_size)
        cluster = getattr(balancer, "cluster_spec", None)
        if cluster is not None and cluster.num_ranks != self.world_size:
            raise ValueError(
                f"the balancer plans for {cluster.num_ranks} ranks but world_size={self.world_size}; "
                "build its ClusterSpec with num_ranks=world_size"
            )
        self._sync = resolve_sync(config.plan_sync, self.world_size)
        self._group = plan_group(self._sync, process_group)
        self.max_length = int(config.max_length or balancer.max_sequence_length)
        if self.max_length > int(balancer.max_sequence_length):
            raise ValueError(
                f"max_length={self.max_length} tokens is above the balancer's largest capacity "
                f"{int(balancer.max_sequence_length)}; lower max_length or add a candidate with more tp/cp"
            )
        self.stats = SamplerStats(num_samples=n)
        self._pieces = self._build_pieces(self.max_length, announce=True)
        self.epoch = 0
        self._start_step = 0
        self._global_step = 0
        self._pending: dict[str, Any] | None = None
        self._cached_epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._stream: PlanStream[SamplerStep] | None = None
        self._last_strategy: str | None = getattr(balancer, "previous_strategy", None)
        self._iteration = 0
        self._pace: Any = None
        """A ``threading.Event`` set while the consumer trains (BalancedDataLoader sets it): see PlanStream's ``pace``."""
        self.completed_epochs = 0
        """Epochs iterated to their end by this object (a broken-off or closed one does not count)."""

    # -- over-long policy ------------------------------------------------------------------------
    def _build_pieces(self, cap: int, *, announce: bool) -> Pieces:
        pieces = build_pieces(
            self.lengths, self.loss_tokens, cap, self.config.overlong, self.stats, self._piece_loss_tokens
        )
        message = describe_cuts(self.stats, self.config.overlong, self.max_length) if announce else None
        if message:
            warnings.warn(message, stacklevel=3)
        return pieces

    # -- epochs ------------------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, bounds) of ``epoch``: sample ids in epoch order and batch boundaries into it."""
        if self._cached_epoch is not None and self._cached_epoch[0] == epoch:
            return self._cached_epoch[1], self._cached_epoch[2]
        cfg = self.config
        order, bounds = epoch_batches(
            self._pieces.kept,
            self._pieces.sample_tokens,
            epoch,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            tokens_per_step=cfg.tokens_per_step,
            sequences_per_step=cfg.sequences_per_step,
            drop_last=cfg.drop_last,
        )
        self._cached_epoch = (epoch, order, bounds)
        return order, bounds

    def num_steps(self, epoch: int | None = None) -> int:
        """Optimizer steps in ``epoch`` (default: the current one)."""
        _, bounds = self._epoch_batches(self.epoch if epoch is None else epoch)
        return int(bounds.size - 1)

    def __len__(self) -> int:
        return self.num_steps()

    def set_epoch(self, epoch: int) -> None:
        """Start the next ``__iter__`` at step 0 of ``epoch`` (like ``DistributedSampler.set_epoch``)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if epoch != self.epoch:
            self._global_step += self._steps_between(self.epoch, self._start_step, epoch)
        self.epoch, self._start_step = int(epoch), 0

    def _steps_between(self, epoch: int, step: int, new_epoch: int) -> int:
        if new_epoch <= epoch:
            return 0
        return (self.num_steps(epoch) - step) + sum(self.num_steps(e) for e in range(epoch + 1, new_epoch))

    def _batch(self, order: np.ndarray, lo: int, hi: int, step: int, epoch: int, in_epoch: int) -> PlanBatch:
        ids, lengths, loss = gather_batch(self._pieces, order[lo:hi], self.lengths.size)
        return PlanBatch(step=step, lengths=lengths, ids=ids, loss_tokens=loss, meta=(epoch, in_epoch))

    def _batches(self, epoch: int, start: int, global_step: int) -> Iterator[PlanBatch]:
        order, bounds = self._epoch_batches(epoch)
        for t in range(start, bounds.size - 1):
            yield self._batch(order, int(bounds[t]), int(bounds[t + 1]), global_step + t - start, epoch, t)

    # -- plans → this rank's work ----------------------------------------------------------------------
    def piece(self, piece_id: int) -> tuple[int, int, int]:
        """``(sample_id, start, end)`` of a plan sequence id (split pieces have ids ``>= len(dataset)``)."""
        n = self.lengths.size
        p = self._pieces
        if piece_id < n:
            return piece_id, 0, int(p.first_len[piece_id])
        e = piece_id - n
        return int(p.extra_sample[e]), int(p.extra_start[e]), int(p.extra_end[e])

    def _build_step(self, batch: PlanBatch, plan: StepPlan) -> SamplerStep:
        epoch, in_epoch = batch.meta
        want_loss = int(batch.loss_tokens.sum())
        if plan.global_sequences != batch.ids.size or plan.global_loss_tokens != want_loss:
            raise ValueError(
                f"step {batch.step}: the plan holds {plan.global_sequences} sequences / {plan.global_loss_tokens} loss "
                f"tokens but the batch has {batch.ids.size} / {want_loss}; the plan does not belong to this batch"
            )
        check_world(plan, self.world_size)
        rank_plan = plan.for_rank(self.rank)
        layout = rank_plan.layout
        where = {int(pid): j for j, pid in enumerate(batch.ids.tolist())}
        n = self.lengths.size
        p = self._pieces
        specs = []
        num = len(rank_plan.micro_batches)
        for k, mb in enumerate(rank_plan.micro_batches):
            sids, starts, ends, full, loss = [], [], [], [], []
            for pid in mb:
                j = where.get(pid)
                if j is None:
                    raise ValueError(f"step {batch.step}: the plan names sequence {pid}, which is not in the batch")
                if pid < n:
                    sid, s0, s1 = pid, 0, int(p.first_len[pid])
                else:
                    sid, s0, s1 = self.piece(pid)
                sids.append(sid)
                starts.append(s0)
                ends.append(s1)
                full.append(int(self.lengths[sid]))
                loss.append(int(batch.loss_tokens[j]))
            specs.append(
                MicroBatchSpec(
                    step=batch.step,
                    epoch=epoch,
                    step_in_epoch=in_epoch,
                    index=k,
                    num_micro_batches=num,
                    sample_ids=tuple(sids),
                    starts=tuple(starts),
                    ends=tuple(ends),
                    full_lengths=tuple(full),
                    loss_tokens=tuple(loss),
                    global_loss_tokens=want_loss,
                    cp=layout.cp,
                    cp_rank=rank_plan.cp_rank,
                )
            )
        return SamplerStep(
            step=batch.step,
            epoch=epoch,
            step_in_epoch=in_epoch,
            plan=plan,
            rank_plan=rank_plan,
            micro_batches=tuple(specs),
            global_loss_tokens=want_loss,
        )

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[SamplerStep]:
        if self._stream is not None:  # an earlier iteration that was broken off
            self._stream.close()
            self._stream.join()
            self._stream = None
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        epoch, start, g0 = self.epoch, self._start_step, self._global_step
        if start > 0 and start >= self.num_steps(epoch):  # a state saved right at the end of an epoch
            epoch, start = epoch + 1, 0
            self.epoch, self._start_step = epoch, 0
        previous0 = getattr(self.balancer, "previous_strategy", None)
        self._last_strategy = previous0
        self._iteration += 1
        mine = self._iteration
        stream: PlanStream[SamplerStep] = PlanStream(
            self.balancer,
            self._batches(epoch, start, g0),
            self._build_step,
            depth=self.config.plan_ahead,
            sync=self._sync,
            group=self._group,
            rank=self.rank,
            pace=self._pace,
        )
        self._stream = stream
        finished = False
        try:
            for item in stream:
                self._start_step = item.step_in_epoch + 1
                self._global_step = item.step + 1
                self._last_strategy = item.plan.strategy
                yield item
            finished = stream.completed
        finally:
            stream.close()
            if finished:
                self.completed_epochs += 1
                self._stream = None
                order, bounds = self._epoch_batches(epoch)
                self.stats.dropped_last_samples += int(order.size - bounds[-1])
                self.epoch, self._start_step = epoch + 1, 0
            elif self._pending is None and self._iteration == mine:
                # Broken off (and nothing loaded or restarted since): the next __iter__ restarts
                # from where this one started, with the balancer's record put back accordingly.
                self._global_step = g0
                self._start_step = start
                self._last_strategy = previous0
                self._pending = self.state_at(epoch, start, g0, previous_strategy=previous0)

    def close(self, timeout: float | None = 120.0) -> None:
        """Stop background planning and wait up to ``timeout`` seconds until it has (``None``: do not wait).

        Peers are told at the next plan exchange, so call it on every rank, e.g. before
        ``destroy_process_group`` when an epoch is left unfinished. Raises
        :class:`~dataloader.planning.PlanSyncError` when the planner is still exchanging
        with a peer after ``timeout``. The next ``__iter__`` starts planning again.
        """
        if self._stream is not None:
            self._stream.close()
            if timeout is not None:
                self._stream.join(timeout)

    # -- state --------------------------------------------------------------------------------------
    def state_at(
        self, epoch: int, step_in_epoch: int, global_step: int, *, previous_strategy: str | None | object = _LAST
    ) -> dict[str, Any]:
        """The state that resumes at ``step_in_epoch`` of ``epoch`` (global step ``global_step``).

        ``previous_strategy``: strategy of the step before the resume point (the Balancer's
        switch penalty depends on it); default: the last step this sampler yielded. Planning
        runs ahead, so the Balancer's own record is usually a few steps further.
        """
        cfg = self.config
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "epoch": int(epoch),
            "step_in_epoch": int(step_in_epoch),
            "global_step": int(global_step),
            "seed": cfg.seed,
            "world_size": self.world_size,
            "num_samples": int(self.lengths.size),
            "batching": self._batching(),
        }
        previous = self._last_strategy if previous_strategy is _LAST else previous_strategy
        child = balancer_state(self.balancer, previous)  # type: ignore[arg-type]
        if child is not None:
            state["balancer"] = child
        return state

    def state_dict(self) -> dict[str, Any]:
        """Where the next ``__iter__`` continues: torchdata's conventions (small, versioned, children nested)."""
        return self.state_at(self.epoch, self._start_step, self._global_step)

    def _batching(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "tokens_per_step": cfg.tokens_per_step,
            "sequences_per_step": cfg.sequences_per_step,
            "shuffle": cfg.shuffle,
            "overlong": cfg.overlong,
            "max_length": self.max_length,
            "drop_last": cfg.drop_last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Validate ``state`` now; apply it at the next ``__iter__``."""
        version = state.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"cannot resume sampler state version {version!r}; this library reads version {_STATE_VERSION}")
        missing = {"epoch", "step_in_epoch", "global_step", "seed", "world_size", "num_samples", "batching"} - set(state)
        if missing:
            raise ValueError(f"cannot resume: sampler state lacks {sorted(missing)}")
        if int(state["num_samples"]) != self.lengths.size:
            raise ValueError(
                f"cannot resume: the dataset had {state['num_samples']} samples, now {self.lengths.size}; "
                "resume on the same dataset"
            )
        if int(state["seed"]) != self.config.seed:
            raise ValueError(f"cannot resume: seed changed {state['seed']} → {self.config.seed}; build the sampler with seed={state['seed']}")
        mine, theirs = self._batching(), dict(state["batching"])
        for key in mine:
            if key == "max_length":
                continue
            if theirs.get(key) != mine[key]:
                raise ValueError(
                    f"cannot resume: {key} changed {theirs.get(key)!r} → {mine[key]!r}; the global batch sequence "
                    f"depends on it, so build the sampler with {key}={theirs.get(key)!r}"
                )
        saved_cap = int(theirs["max_length"])
        if saved_cap != self.max_length and saved_cap > int(self.balancer.max_sequence_length):
            raise ValueError(
                f"cannot resume: the run cut samples at max_length={saved_cap} tokens but the new balancer holds at most "
                f"{int(self.balancer.max_sequence_length)}; add a candidate with more capacity"
            )
        for key in ("epoch", "step_in_epoch", "global_step"):
            if int(state[key]) < 0:
                raise ValueError(f"cannot resume: {key}={state[key]} must be >= 0")
        self._pending = dict(state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        saved_cap = int(state["batching"]["max_length"])
        if saved_cap != self.max_length:
            self.max_length = saved_cap
            self.stats = SamplerStats(num_samples=self.lengths.size)
            self._pieces = self._build_pieces(saved_cap, announce=False)
            self._cached_epoch = None
        self.epoch = int(state["epoch"])
        self._start_step = int(state["step_in_epoch"])
        self._global_step = int(state["global_step"])
        child = state.get("balancer")
        loader = getattr(self.balancer, "load_state_dict", None)
        if child is not None and loader is not None:
            if int(state["world_size"]) == self.world_size:
                loader(child)
            else:
                warnings.warn(
                    f"resuming on {self.world_size} ranks (was {state['world_size']}): the epoch continues with the same "
                    "global batches; the balancer's per-rank state (straggler speeds) starts fresh",
                    stacklevel=3,
                )


def balancer_state(balancer: Any, previous_strategy: str | None) -> dict[str, Any] | None:
    """The balancer's state with ``previous_strategy`` set to the last *consumed* step's strategy.

    The balancer plans ahead, so its own record names a step the training loop has not
    reached; resuming with it could change the switch penalty of the next plan.
    """
    get = getattr(balancer, "state_dict", None)
    if get is None:
        return None
    state = dict(get())
    if "previous_strategy" in state:
        state["previous_strategy"] = previous_strategy
    return state
