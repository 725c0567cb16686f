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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from strategies.plan import RankPlan, StepPlan

from .agreement import PlanBatch, rank_plan_for
from .config import SamplerConfig, SamplerStats
from .distributed import group_timeout_s, plan_group, rank_and_world, resolve_sync
from .epochs import epoch_batches, gather_batch, micro_batch_specs
from .lengths import check_lengths
from .lookahead import LookaheadWindows, lookahead_steps
from .pieces import OVERLONG_POLICIES, Pieces, build_pieces, check_loss_tokens, describe_cuts
from .planning import PlanStream
from .sampler_resume import Pending, SamplerResume
from .sizes import MicroBatchSizeCheck, step_size_warning
from .spec import MicroBatchSpec
from .state import Position, SavedState, balancer_state, lengths_fingerprint

__all__ = ["OVERLONG_POLICIES", "BalancedBatchSampler", "SamplerConfig", "SamplerStats", "SamplerStep", "balancer_state"]


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


class BalancedBatchSampler(SamplerResume):
    """Global batches → balanced plans → this rank's micro-batches, one step at a time.

    ``lengths``: tokens per sample (``int64[n]``, index = sample id). ``balancer``: a
    :class:`balancer.selector.Balancer` (or anything with ``plan``, ``prefetch`` and
    ``max_sequence_length``). ``loss_tokens``: loss-carrying tokens per sample (default
    ``lengths − 1``). ``piece_loss_tokens(sample_id, starts, ends) -> int64[k]`` counts
    loss tokens of truncated/split pieces when ``loss_tokens`` is custom. ``rank`` /
    ``world_size`` default to torch.distributed (else 0 / 1).

    Iterating yields one :class:`SamplerStep` per optimizer step. Each ``__iter__`` runs
    one epoch from the current position and then advances the epoch; a loaded state
    (:meth:`load_state_dict`) applies at the next ``__iter__``. Saving and loading the position
    (``state_at``, ``state_dict``, ``load_state_dict``) come from
    :class:`~dataloader.sampler_resume.SamplerResume`.
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
        if n == 0:
            raise ValueError("the dataset has no samples (lengths is empty): there is nothing to train on; check its filters")
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
        self.max_length = int(config.max_length or balancer.max_sequence_length)
        if self.max_length > int(balancer.max_sequence_length):
            raise ValueError(
                f"max_length={self.max_length} tokens is above the balancer's largest capacity "
                f"{int(balancer.max_sequence_length)}; lower max_length or add a candidate with more tp/cp"
            )
        self.stats = SamplerStats(num_samples=n)
        self._pieces = self._build_pieces(self.max_length, announce=True)
        self._fingerprint: str | None = None
        too_big = step_size_warning(
            tokens_per_step=config.tokens_per_step, sequences_per_step=config.sequences_per_step,
            epoch_tokens=int(self._pieces.sample_tokens[self._pieces.kept].sum()),
            epoch_sequences=int(self._pieces.kept.size),
        )
        if too_big:
            warnings.warn(too_big, stacklevel=2)
        self._sizes = MicroBatchSizeCheck(getattr(balancer, "cost_model", None))
        self._lookahead = (
            LookaheadWindows(balancer, sampled=self._sampled_step, num_steps=self.num_steps, tokens_per_step=config.tokens_per_step)
            if lookahead_steps(balancer)
            else None
        )
        """Regroups windows of ``BalancerConfig.lookahead_steps`` batches (:mod:`dataloader.lookahead`)."""
        self.epoch = 0
        self._start_step = 0
        self._global_step = 0
        self._pending: Pending | None = None
        self._cached_epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._stream: PlanStream[SamplerStep] | None = None
        self._last_strategy: str | None = getattr(balancer, "previous_strategy", None)
        self._iteration = 0
        self._pace: Any = None
        """A ``threading.Event`` set while the consumer trains (BalancedDataLoader sets it): see PlanStream's ``pace``."""
        self.completed_epochs = 0
        """Epochs iterated to their end by this object (a broken-off or closed one does not count)."""
        if self.num_steps(0) == 0:
            raise ValueError(self._no_steps_reason())
        # Last: created collectively, after every check that could fail on one rank only.
        self._group = plan_group(self._sync, process_group, config.sync_timeout_s)
        self._timeout_s = group_timeout_s(self._group)

    def _no_steps_reason(self) -> str:
        kept = int(self._pieces.kept.size)
        if kept == 0:
            return (
                f"every one of the {self.lengths.size} samples is longer than max_length={self.max_length} tokens and "
                f"overlong={self.config.overlong!r} dropped it: there is nothing to train on; raise max_length or use "
                "overlong='truncate' or 'split'"
            )
        return (
            f"drop_last=True leaves no step: the {kept} samples do not fill one step "
            f"({self._budget()}); lower the budget or set drop_last=False"
        )

    def _budget(self) -> str:
        cfg = self.config
        if cfg.sequences_per_step is not None:
            return f"sequences_per_step={cfg.sequences_per_step}"
        return f"tokens_per_step={cfg.tokens_per_step}"

    @property
    def fingerprint(self) -> str:
        """Hash of the lengths array (computed once): a resume state only loads on the same lengths."""
        if self._fingerprint is None:
            self._fingerprint = lengths_fingerprint(self.lengths)
        return self._fingerprint

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
    def _epoch_batches(self, epoch: int, pieces: Pieces | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(order, bounds) of ``epoch``: sample ids in epoch order and batch boundaries into it.

        ``pieces``: other pieces than this sampler's (e.g. at a resumed state's ``max_length``); not cached.
        """
        if pieces is None and self._cached_epoch is not None and self._cached_epoch[0] == epoch:
            return self._cached_epoch[1], self._cached_epoch[2]
        cfg = self.config
        p = self._pieces if pieces is None else pieces
        order, bounds = epoch_batches(
            p.kept,
            p.sample_tokens,
            epoch,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
            tokens_per_step=cfg.tokens_per_step,
            sequences_per_step=cfg.sequences_per_step,
            drop_last=cfg.drop_last,
        )
        if pieces is None:
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
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be an integer >= 0")
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

    def _sampled_step(self, epoch: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, lengths, loss_tokens)`` of step ``t`` of ``epoch`` as sampled."""
        order, bounds = self._epoch_batches(epoch)
        return gather_batch(self._pieces, order[int(bounds[t]) : int(bounds[t + 1])], self.lengths.size)

    def _batches(self, epoch: int, start: int, global_step: int) -> Iterator[PlanBatch]:
        if self._lookahead is not None:
            yield from self._lookahead.batches(epoch, start, global_step)
            return
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
        rank_plan = rank_plan_for(batch, plan, self.rank, self.world_size)
        specs = micro_batch_specs(self._pieces, self.lengths, batch, rank_plan, epoch=epoch, step_in_epoch=in_epoch)
        return SamplerStep(
            step=batch.step,
            epoch=epoch,
            step_in_epoch=in_epoch,
            plan=plan,
            rank_plan=rank_plan,
            micro_batches=specs,
            global_loss_tokens=int(batch.loss_tokens.sum()),
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
            first_step=g0,
            timeout_s=self._timeout_s,
        )
        self._stream = stream
        finished = False
        try:
            for item in stream:
                oversized = self._sizes.check(item.step, self.rank, item.rank_plan.layout, item.micro_batches)
                if oversized:
                    warnings.warn(oversized, stacklevel=2)
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
                child = balancer_state(self.balancer, previous0)
                saved = SavedState(Position(epoch, start, g0), self.world_size, child)
                if self._lookahead is None:
                    self._pending = Pending(saved, self.max_length)
                else:  # the rest of the window as it was (a resumed queue included)
                    queue = self._lookahead.state_at(epoch, start)
                    window = self._lookahead.check_state(queue, epoch, start)
                    self._pending = Pending(saved, self.max_length, queue, window)

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
