"""Balanced steps over a stream: ``IterableDataset`` and Hugging Face streaming datasets.

A stream has no lengths up front and no random access, so batches are formed as
samples arrive, in arrival order, by the same budget rule as map-style datasets
(``tokens_per_step`` or ``sequences_per_step``), and each is planned as soon as it is
complete. Reading happens in the planning thread and runs at most ``plan_ahead`` steps
ahead of the training loop: the look-ahead window holds a few steps of samples, never
the stream. This rank's micro-batches are collated in the same thread, so a step is
ready when the loop asks for it. Two ways to feed the ranks (``stream_split``):

* ``"replicated"`` (default): every rank reads the whole, same stream (each needs every
  length to derive the same plan) and keeps only the samples of its own micro-batches.
  Plan ids are stream positions; pieces of split samples after the first get ids
  ``2**48 + k``. A stream split per rank by accident (``split_dataset_by_node``,
  ``IterableDataset.shard``, per-rank files) is refused at its first step: the ranks
  compare a fingerprint of every global batch — ids, token counts, loss tokens and each
  sample's first token ids — and raise on every rank when they differ, or when one
  rank's stream ends before another's.
* ``"per_rank"``: every rank reads its own shard with the local budget
  (``tokens_per_step // world_size`` or ``sequences_per_step / world_size``); the ranks
  exchange what they hold, plan the merged global batch and send each sample to the
  ranks whose micro-batches hold it (:mod:`dataloader.stream_shards`). Sample ``p`` of
  rank ``r``'s stream has id ``p * world_size + r``. The epoch ends when every rank's
  stream has ended; shards of different sizes train every sample once.

Resuming: the state is the number of stream samples consumed by finished steps (per
rank, for ``per_rank``: ``shards``), plus epoch and step counters, and a fingerprint of
those samples' token counts. Resuming skips exactly that many samples — checking the
fingerprint on the way and refusing a stream that differs or ends first — and continues
with the next one, so no sample is lost or repeated, provided the stream yields the same
samples in the same order when iterated again (a fixed file order, or a seeded shuffle:
Hugging Face ``IterableDataset.set_epoch`` is called with the epoch). A ``per_rank``
state resumes on the same number of ranks only. Sample order is the stream's own:
``shuffle``/``seed`` of the config do not reorder a stream.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from strategies.plan import StepPlan

from .agreement import PlanBatch, rank_plan_for
from .batch import StepBatch, cut_sample
from .collate import Collator
from .config import SamplerConfig, SamplerStats
from .distributed import group_timeout_s, plan_group, rank_and_world, resolve_sync
from .planning import PlanStream, PlanSyncError
from .spec import MicroBatchSpec
from .state import STATE_VERSION, LengthsHash, Position, SavedState, balancer_state, read_stream_state
from .stream_read import PIECE_ID_BASE, Row, Share, StreamReader, token_key, tokens_of
from .stream_shards import ShardRounds, shard_budget

__all__ = ["PIECE_ID_BASE", "StreamingSteps"]

_CLOSE_TIMEOUT = 30.0
"""Seconds a broken-off iteration waits for its planning thread to finish the stop exchange."""
_EMPTY = LengthsHash().hexdigest()
STREAM_HINT = (
    "with stream_split='replicated' (the default) every rank must read the same, complete stream in the same order. "
    "To feed each rank its own shard (datasets.distributed.split_dataset_by_node, IterableDataset.shard, per-rank "
    "files), build the loader with stream_split='per_rank'; otherwise do not split the stream and seed any shuffle "
    "identically on every rank"
)


class StreamingSteps:
    """Iterate balanced :class:`~dataloader.loader.StepBatch` es over a stream (module docstring)."""

    def __init__(
        self,
        dataset: Any,
        balancer: Any,
        config: SamplerConfig,
        *,
        collate: Any,
        input_key: str = "input_ids",
        labels_key: str = "labels",
        sequence_keys: Sequence[str] = ("input_ids", "labels"),
        rank: int | None = None,
        world_size: int | None = None,
        process_group: Any = None,
        pin_memory: bool = False,
    ) -> None:
        self.dataset = dataset
        self.balancer = balancer
        self.config = config
        self.collate = collate
        self.input_key, self.labels_key = input_key, labels_key
        self.sequence_keys = tuple(sequence_keys)
        self.rank, self.world_size = rank_and_world(rank, world_size)
        self._sync = resolve_sync(config.plan_sync, self.world_size)
        self.per_rank = config.stream_split == "per_rank"
        self._budget = (config.tokens_per_step, config.sequences_per_step)
        if self.per_rank:
            self._check_per_rank()
            self._budget = shard_budget(config.tokens_per_step, config.sequences_per_step, self.world_size)
        self.max_length = int(config.max_length or balancer.max_sequence_length)
        if self.max_length > int(balancer.max_sequence_length):
            raise ValueError(
                f"max_length={self.max_length} tokens is above the balancer's largest capacity {int(balancer.max_sequence_length)}"
            )
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.stats = SamplerStats()
        """What the over-long policy and drop_last did to the stream this rank reads."""
        self.epoch = 0
        self._positions = self._start_positions()
        """(samples consumed, their fingerprint) of the stream of each rank (``per_rank``) or the one stream."""
        self._step_in_epoch = 0
        self._global_step = 0
        self._stream: PlanStream[tuple[StepBatch, Any]] | None = None
        self._last_strategy: str | None = getattr(balancer, "previous_strategy", None)
        self._group = plan_group(self._sync, process_group, config.sync_timeout_s)
        self._timeout_s = group_timeout_s(self._group)

    def _check_per_rank(self) -> None:
        if self.world_size > 1 and self._sync == "none":
            raise ValueError(
                f"stream_split='per_rank' on {self.world_size} ranks moves samples between ranks every step: it needs "
                "an initialised torch.distributed and plan_sync 'auto', 'broadcast' or 'verify' (got plan_sync='none')"
            )
        if self.config.drop_last:
            raise ValueError(
                "stream_split='per_rank' trains every sample of every shard once (shards of different sizes end at "
                "different steps, and the last steps hold what is left); drop_last=True is not supported with it: "
                "use drop_last=False"
            )

    def _start_positions(self) -> list[tuple[int, str]]:
        return [(0, _EMPTY)] * (self.world_size if self.per_rank else 1)

    def _reader(self) -> StreamReader:
        what = f"the state's shards[{self.rank}]" if self.per_rank else "the state"
        return StreamReader(
            self.dataset, input_key=self.input_key, labels_key=self.labels_key, max_length=self.max_length,
            overlong=self.config.overlong, stats=self.stats, what=what,
        )

    # -- replicated: the global batches of the one stream ---------------------------------------------
    def _batches(self, reader: StreamReader, epoch: int, at: Position) -> Iterator[PlanBatch]:
        cfg = self.config
        skip, expect = self._positions[0]
        step = at.global_step
        share: Share | None = None
        for share in reader.shares(epoch, skip, expect, tokens=cfg.tokens_per_step, sequences=cfg.sequences_per_step):
            if not share.closed and cfg.drop_last:
                self.stats.dropped_last_samples += len(share.items)
                break
            yield _global_batch(step, share, self.input_key)
            step += 1
        if step == at.global_step and skip == 0:
            left = len(share.items) if share is not None else 0
            raise ValueError(self._no_steps_reason(epoch, reader.read, left))

    def _no_steps_reason(self, epoch: int, read: int, left: int) -> str:
        if read == 0:
            return f"the stream yielded no samples for epoch {epoch}: there is nothing to train on (an empty stream?)"
        if left == 0:
            return (
                f"every one of the {read} samples of epoch {epoch}'s stream is longer than max_length={self.max_length} "
                "tokens and overlong='drop' dropped it; raise max_length or use overlong='truncate' or 'split'"
            )
        return (
            f"drop_last=True leaves no step in epoch {epoch}: the stream's {left} samples do not fill one step; lower "
            "the budget or set drop_last=False"
        )

    # -- plans → this rank's collated micro-batches ---------------------------------------------------
    def _build(self, epoch: int, epoch_start: int, batch: PlanBatch, plan: StepPlan) -> tuple[StepBatch, Any]:
        """This rank's collated step and the stream position(s) after it (``batch.meta``: rows by plan id, positions)."""
        where, position = batch.meta
        self.stats.plan_seconds += plan.plan_seconds
        in_epoch = batch.step - epoch_start
        rank_plan = rank_plan_for(batch, plan, self.rank, self.world_size)
        glt = int(batch.loss_tokens.sum())
        num = len(rank_plan.micro_batches)
        specs, outs = [], []
        for k, mb in enumerate(rank_plan.micro_batches):
            rows: list[Row] = [where[pid] for pid in mb]
            spec = MicroBatchSpec(
                step=batch.step,
                epoch=epoch,
                step_in_epoch=in_epoch,
                index=k,
                num_micro_batches=num,
                sample_ids=tuple(r.sample_id for r in rows),
                starts=tuple(r.start for r in rows),
                ends=tuple(r.end for r in rows),
                full_lengths=tuple(r.full_length for r in rows),
                loss_tokens=tuple(r.loss_tokens for r in rows),
                global_loss_tokens=glt,
                cp=rank_plan.layout.cp,
                cp_rank=rank_plan.cp_rank,
            )
            samples = [cut_sample(r.sample, spec, j, self.input_key, self.sequence_keys) for j, r in enumerate(rows)]
            if isinstance(self.collate, Collator):
                out = self.collate(samples, spec)
            else:
                out = self.collate(samples) if samples else None
            if self.pin_memory:
                from torch.utils.data._utils.pin_memory import pin_memory

                out = pin_memory(out)
            specs.append(spec)
            outs.append(out)
        step = StepBatch(
            step=batch.step,
            epoch=epoch,
            step_in_epoch=in_epoch,
            plan=plan,
            rank_plan=rank_plan,
            micro_batches=outs,
            specs=tuple(specs),
            global_loss_tokens=glt,
        )
        return step, position

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StepBatch]:
        if self._stream is not None:  # broken off: stop its planning, then undo what it planned ahead
            self._stream.close()
            self._stream.join()
            self._stream = None
            state = balancer_state(self.balancer, self._last_strategy)
            if state is not None:
                self.balancer.load_state_dict(state)
        while True:
            epoch, skipped, before = self.epoch, sum(n for n, _ in self._positions), self._global_step
            yield from self._epoch(epoch)
            # A state saved after an epoch's last step resumes with nothing left of that epoch:
            # continue with the next one (as the map-style sampler does), not with an empty iteration.
            if self._global_step != before or skipped == 0 or self.epoch == epoch:
                return

    def _epoch(self, epoch: int) -> Iterator[StepBatch]:
        at = Position(epoch, self._step_in_epoch, self._global_step)
        build = partial(self._build, epoch, at.epoch_start_step)
        common: dict[str, Any] = {
            "depth": self.config.plan_ahead, "sync": self._sync, "group": self._group, "rank": self.rank,
            "timeout_s": self._timeout_s, "stats": self.stats,
        }
        reader = self._reader()
        stream: PlanStream[tuple[StepBatch, Any]]
        if self.per_rank:
            skip, expect = self._positions[self.rank]
            tokens, sequences = self._budget
            stream = ShardRounds(
                self.balancer, reader, reader.shares(epoch, skip, expect, tokens=tokens, sequences=sequences), build,
                world_size=self.world_size, start=(skip, expect), first_step=at.global_step,
                resumed=at.step_in_epoch > 0, epoch=epoch, **common,
            )
        else:
            stream = PlanStream(
                self.balancer, self._batches(reader, epoch, at), build, first_step=at.global_step,
                data_hint=STREAM_HINT, **common,
            )
        self._stream = stream
        try:
            for item, position in stream:
                self._positions = list(position) if self.per_rank else [position]
                self._step_in_epoch, self._global_step = item.step_in_epoch + 1, item.step + 1
                self._last_strategy = item.plan.strategy
                yield item
            if stream.completed:
                self.epoch, self._step_in_epoch = epoch + 1, 0
                self._positions = self._start_positions()
                self._stream = None
        finally:
            stream.close()
            if not stream.completed:  # broken off: let the stop exchange with the peers finish now
                try:
                    stream.join(_CLOSE_TIMEOUT)
                except PlanSyncError as e:
                    warnings.warn(f"{e}; call loader.close() on every rank before destroy_process_group", stacklevel=2)

    def close(self, timeout: float | None = 120.0) -> None:
        """Stop background reading and planning; wait up to ``timeout`` s (``None``: do not wait). Call on every rank."""
        if self._stream is not None:
            self._stream.close()
            if timeout is not None:
                self._stream.join(timeout)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be an integer >= 0")
        if epoch != self.epoch:
            self.epoch, self._step_in_epoch = int(epoch), 0
            self._positions = self._start_positions()

    # -- state ----------------------------------------------------------------------------------------
    def _batching(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "tokens_per_step": cfg.tokens_per_step,
            "sequences_per_step": cfg.sequences_per_step,
            "overlong": cfg.overlong,
            "max_length": self.max_length,
            "drop_last": cfg.drop_last,
            "stream_split": cfg.stream_split,
        }

    def state_dict(self) -> dict[str, Any]:
        """Samples consumed by finished steps of the current epoch and their fingerprint, plus counters (module docstring).

        ``per_rank``: ``shards`` holds every rank's count and fingerprint (each rank knows all of
        them), so the state saved on one rank resumes every rank; ``samples_consumed`` is their sum.
        """
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            **Position(self.epoch, self._step_in_epoch, self._global_step).to_dict(),
            "samples_consumed": sum(n for n, _ in self._positions),
            "world_size": self.world_size,
            "batching": self._batching(),
        }
        if self.per_rank:
            state["shards"] = [{"samples_consumed": n, "consumed_fingerprint": f} for n, f in self._positions]
        else:
            state["consumed_fingerprint"] = self._positions[0][1]
        child = balancer_state(self.balancer, self._last_strategy)
        if child is not None:
            state["balancer"] = child
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check every field now; the skipped samples are checked against the fingerprint(s) when iteration starts."""
        saved = read_stream_state(state, batching=self._batching(), world_size=self.world_size)
        self.max_length = self._resume_cap(saved)
        at = saved.position
        self.epoch, self._step_in_epoch, self._global_step = at.epoch, at.step_in_epoch, at.global_step
        self._positions = list(saved.shards) if self.per_rank else [(saved.samples_consumed, saved.consumed_fingerprint)]
        loader = getattr(self.balancer, "load_state_dict", None)
        if saved.balancer is not None and loader is not None and saved.world_size == self.world_size:
            loader(saved.balancer)
            self._last_strategy = saved.balancer.get("previous_strategy")

    def _resume_cap(self, saved: SavedState) -> int:
        """The over-long threshold that continues the saved run's batching (raises when none can)."""
        cap, largest = saved.max_length, int(self.balancer.max_sequence_length)
        if cap == self.max_length or self.config.overlong == "error":
            return self.max_length  # 'error' cuts nothing: a sample above the new cap raises when it is read
        if cap <= largest:
            return cap
        raise ValueError(
            f"cannot resume: the run cuts samples at max_length={cap} tokens (overlong={self.config.overlong!r}) but "
            f"the new balancer holds at most {largest}: the rest of the stream would be cut differently. Add a "
            "candidate with more capacity (more tp/cp), or start a new epoch with set_epoch"
        )


def _global_batch(step: int, share: Share, input_key: str) -> PlanBatch:
    """Replicated mode: one share of the stream is the step's global batch (ids: stream positions)."""
    samples = {pos: sample for pos, sample, _, _ in share.items}
    ids, lens, loss, where = [], [], [], {}
    extra = 0
    previous = -1
    for pos, lo, hi, lt, n in share.rows():
        pid = pos if pos != previous else PIECE_ID_BASE + extra
        extra += pos == previous
        previous = pos
        ids.append(pid)
        lens.append(hi - lo)
        loss.append(lt)
        where[pid] = Row(pos, samples[pos], lo, hi, lt, n)
    content = [token_key(tokens_of(sample, input_key)) for sample in samples.values()]
    return PlanBatch(
        step=step,
        lengths=np.asarray(lens, dtype=np.int64),
        ids=np.asarray(ids, dtype=np.int64),
        loss_tokens=np.asarray(loss, dtype=np.int64),
        meta=(where, (share.end, share.fingerprint)),
        content=b"".join(content),
    )

