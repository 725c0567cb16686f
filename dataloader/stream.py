"""Balanced steps over a stream: ``IterableDataset`` and Hugging Face streaming datasets.

A stream has no lengths up front and no random access, so batches are formed as
samples arrive, in arrival order, by the same budget rule as map-style datasets
(``tokens_per_step`` or ``sequences_per_step``), and each is planned as soon as it is
complete. Reading happens in the planning thread and runs at most ``plan_ahead`` steps
ahead of the training loop: the look-ahead window holds a few steps of samples, never
the stream. This rank's micro-batches are collated in the same thread, so a step is
ready when the loop asks for it.

Every rank reads the whole stream (each needs every length to derive the same plan)
and keeps only the samples of its own micro-batches. Plan ids are stream positions
(samples since the start of the epoch's stream); pieces of split samples after the
first get ids ``2**48 + k``.

Resuming: the state is the number of stream samples consumed by finished steps (plus
epoch and step counters). Resuming skips exactly that many samples and continues with
the next one, so no sample is lost or repeated — provided the stream yields the same
samples in the same order when iterated again (a fixed file order, or a seeded shuffle:
Hugging Face ``IterableDataset.set_epoch`` is called with the epoch). Sample order is
the stream's own: ``shuffle``/``seed`` of the config do not reorder a stream.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from strategies.plan import StepPlan

from .batch import StepBatch, cut_sample
from .collate import Collator
from .distributed import plan_group, rank_and_world, resolve_sync
from .lengths import IGNORE_INDEX
from .planning import PlanBatch, PlanStream, PlanSyncError
from .sampler import SamplerConfig, SamplerStats, balancer_state
from .spec import MicroBatchSpec

__all__ = ["PIECE_ID_BASE", "StreamingSteps"]

PIECE_ID_BASE = 1 << 48
"""Plan ids of split pieces after the first, in streaming mode (stream positions stay below it)."""
_STATE_VERSION = 1
_CLOSE_TIMEOUT = 30.0
"""Seconds a broken-off iteration waits for its planning thread to finish the stop exchange."""


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
        self._group = plan_group(self._sync, process_group)
        self.max_length = int(config.max_length or balancer.max_sequence_length)
        if self.max_length > int(balancer.max_sequence_length):
            raise ValueError(
                f"max_length={self.max_length} tokens is above the balancer's largest capacity {int(balancer.max_sequence_length)}"
            )
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.stats = SamplerStats()
        self.epoch = 0
        self._consumed = 0
        self._step_in_epoch = 0
        self._global_step = 0
        self._stream: PlanStream[tuple[StepBatch, int]] | None = None
        self._last_strategy: str | None = getattr(balancer, "previous_strategy", None)

    # -- reading --------------------------------------------------------------------------------
    def _source(self, epoch: int, skip: int) -> Iterator[Any]:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        return itertools.islice(iter(self.dataset), skip, None)

    def _measure(self, sample: Any, pos: int) -> tuple[int, np.ndarray | None]:
        """(tokens, label-carrying prefix sums or None) of one stream sample."""
        if isinstance(sample, Mapping) and self.input_key not in sample:
            raise ValueError(f"stream sample {pos} has no field {self.input_key!r}; fields: {sorted(sample)}")
        tokens = sample[self.input_key] if isinstance(sample, Mapping) else sample
        n = len(tokens)
        if n < 1:
            raise ValueError(f"stream sample {pos} has 0 tokens; every sample needs at least 1 token (filter empty rows)")
        if isinstance(sample, Mapping) and self.labels_key in sample:
            labels = np.asarray(sample[self.labels_key])
            if labels.shape != (n,):
                raise ValueError(f"stream sample {pos}: {self.labels_key!r} has {labels.size} entries, {self.input_key!r} has {n}")
            return n, np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
        return n, None

    def _pieces(self, n: int, pos: int) -> list[tuple[int, int]]:
        cap, policy = self.max_length, self.config.overlong
        if n <= cap:
            return [(0, n)]
        if policy == "error":
            raise ValueError(
                f"stream sample {pos} has {n} tokens, above the largest capacity {cap}; "
                "use overlong='truncate', 'split' or 'drop', or add a candidate with more capacity"
            )
        if policy == "drop":
            return []
        if policy == "truncate":
            self.stats.truncated += 1
            self.stats.truncated_tokens += n - cap
            return [(0, cap)]
        out = [(0, cap)]
        while out[-1][1] < n:
            start = out[-1][1] - 1  # overlap one token: every target is trained exactly once
            out.append((start, min(n, start + cap)))
        self.stats.split += 1
        self.stats.extra_pieces += len(out) - 1
        return out

    def _batches(self, epoch: int, skip: int, step_in_epoch: int, global_step: int) -> Iterator[PlanBatch]:
        cfg = self.config
        pending: list[tuple[int, Any, list[tuple[int, int]], np.ndarray | None]] = []
        acc = 0
        budget = cfg.tokens_per_step or 0
        step, in_epoch = global_step, step_in_epoch

        def emit(end: int) -> PlanBatch:
            ids, lens, loss, where = [], [], [], {}
            extra = 0
            for pos, sample, pieces, carries in pending:
                for j, (lo, hi) in enumerate(pieces):
                    pid = pos if j == 0 else PIECE_ID_BASE + extra
                    extra += j > 0
                    ids.append(pid)
                    lens.append(hi - lo)
                    loss.append(int(carries[hi] - carries[min(lo + 1, hi)]) if carries is not None else hi - lo - 1)
                    where[pid] = (pos, sample, lo, hi, loss[-1])
            return PlanBatch(
                step=step,
                lengths=np.asarray(lens, dtype=np.int64),
                ids=np.asarray(ids, dtype=np.int64),
                loss_tokens=np.asarray(loss, dtype=np.int64),
                meta=(epoch, in_epoch, end, where),
            )

        pos = skip
        for pos, sample in enumerate(self._source(epoch, skip), start=skip):
            if pos >= PIECE_ID_BASE:
                raise ValueError(f"stream epoch longer than {PIECE_ID_BASE} samples; start a new epoch earlier")
            n, carries = self._measure(sample, pos)
            pieces = self._pieces(n, pos)
            if not pieces:
                self.stats.dropped_overlong += 1
                if len(self.stats.dropped_overlong_ids) < 16:
                    self.stats.dropped_overlong_ids.append(pos)
                continue
            tokens = sum(hi - lo for lo, hi in pieces)
            if cfg.sequences_per_step is not None:
                full = len(pending) == cfg.sequences_per_step
            else:
                full = acc > 0 and acc + tokens > budget
            if full:
                yield emit(pos)  # every sample before ``pos`` is now in a batch or dropped
                pending, acc = [], 0
                step, in_epoch = step + 1, in_epoch + 1
            pending.append((pos, sample, pieces, carries))
            acc += tokens
            self.stats.num_samples = pos + 1
        if pending:
            partial = cfg.tokens_per_step is not None or len(pending) < int(cfg.sequences_per_step or 0)
            if cfg.drop_last and partial:
                self.stats.dropped_last_samples += len(pending)
            else:
                yield emit(pos + 1)

    # -- plans → this rank's collated micro-batches ---------------------------------------------------
    def _build(self, batch: PlanBatch, plan: StepPlan) -> tuple[StepBatch, int]:
        """This rank's collated step, and the stream position after the batch."""
        epoch, in_epoch, end, where = batch.meta
        if plan.num_ranks != self.world_size:
            raise ValueError(f"plan for step {plan.step} covers {plan.num_ranks} ranks but the loader runs on {self.world_size}")
        rank_plan = plan.for_rank(self.rank)
        glt = int(batch.loss_tokens.sum())
        num = len(rank_plan.micro_batches)
        specs, outs = [], []
        for k, mb in enumerate(rank_plan.micro_batches):
            rows = [where[pid] for pid in mb]
            spec = MicroBatchSpec(
                step=batch.step,
                epoch=epoch,
                step_in_epoch=in_epoch,
                index=k,
                num_micro_batches=num,
                sample_ids=tuple(r[0] for r in rows),
                starts=tuple(r[2] for r in rows),
                ends=tuple(r[3] for r in rows),
                full_lengths=tuple(len(r[1][self.input_key] if isinstance(r[1], Mapping) else r[1]) for r in rows),
                loss_tokens=tuple(r[4] for r in rows),
                global_loss_tokens=glt,
                cp=rank_plan.layout.cp,
                cp_rank=rank_plan.cp_rank,
            )
            samples = [cut_sample(r[1], spec, j, self.input_key, self.sequence_keys) for j, r in enumerate(rows)]
            if isinstance(self.collate, Collator):
                out = self.collate(samples, spec)
            else:
                out = self.collate(samples) if samples else None
            if self.pin_memory:
                from torch.utils.data._utils.pin_memory import pin_memory

                out = pin_memory(out)
            specs.append(spec)
            outs.append(out)
        return StepBatch(
            step=batch.step,
            epoch=epoch,
            step_in_epoch=in_epoch,
            plan=plan,
            rank_plan=rank_plan,
            micro_batches=outs,
            specs=tuple(specs),
            global_loss_tokens=glt,
        ), end

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StepBatch]:
        if self._stream is not None:  # broken off: stop its planning, then undo what it planned ahead
            self._stream.close()
            self._stream.join()
            self._stream = None
            state = balancer_state(self.balancer, self._last_strategy)
            if state is not None:
                self.balancer.load_state_dict(state)
        epoch, skip, in_epoch, g0 = self.epoch, self._consumed, self._step_in_epoch, self._global_step
        stream = PlanStream(
            self.balancer,
            self._batches(epoch, skip, in_epoch, g0),
            self._build,
            depth=self.config.plan_ahead,
            sync=self._sync,
            group=self._group,
            rank=self.rank,
        )
        self._stream = stream
        try:
            for item, end in stream:
                self._consumed, self._step_in_epoch, self._global_step = end, item.step_in_epoch + 1, item.step + 1
                self._last_strategy = item.plan.strategy
                yield item
            if stream.completed:
                self.epoch, self._consumed, self._step_in_epoch = epoch + 1, 0, 0
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
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if epoch != self.epoch:
            self.epoch, self._consumed, self._step_in_epoch = int(epoch), 0, 0

    # -- state ----------------------------------------------------------------------------------------
    def _batching(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "tokens_per_step": cfg.tokens_per_step,
            "sequences_per_step": cfg.sequences_per_step,
            "overlong": cfg.overlong,
            "max_length": self.max_length,
            "drop_last": cfg.drop_last,
        }

    def state_dict(self) -> dict[str, Any]:
        """Samples consumed by finished steps of the current epoch, plus counters (module docstring)."""
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "samples_consumed": self._consumed,
            "step_in_epoch": self._step_in_epoch,
            "global_step": self._global_step,
            "world_size": self.world_size,
            "batching": self._batching(),
        }
        child = balancer_state(self.balancer, self._last_strategy)
        if child is not None:
            state["balancer"] = child
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"cannot resume stream state version {state.get('version')!r} (expected {_STATE_VERSION})")
        missing = {"epoch", "samples_consumed", "step_in_epoch", "global_step", "world_size", "batching"} - set(state)
        if missing:
            raise ValueError(f"cannot resume: stream state lacks {sorted(missing)}")
        mine, theirs = self._batching(), dict(state["batching"])
        for key, value in mine.items():
            if theirs.get(key) != value:
                raise ValueError(
                    f"cannot resume: {key} changed {theirs.get(key)!r} → {value!r}; batches depend on it, "
                    f"so build the loader with {key}={theirs.get(key)!r}"
                )
        for key in ("epoch", "samples_consumed", "step_in_epoch", "global_step"):
            if int(state[key]) < 0:
                raise ValueError(f"cannot resume: {key}={state[key]} must be >= 0")
        self.epoch = int(state["epoch"])
        self._consumed = int(state["samples_consumed"])
        self._step_in_epoch = int(state["step_in_epoch"])
        self._global_step = int(state["global_step"])
        child, loader = state.get("balancer"), getattr(self.balancer, "load_state_dict", None)
        if child is not None and loader is not None and int(state["world_size"]) == self.world_size:
            loader(child)
            self._last_strategy = child.get("previous_strategy")
