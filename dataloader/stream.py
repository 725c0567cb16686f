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
first get ids ``2**48 + k``. A stream split per rank (``split_dataset_by_node``,
``IterableDataset.shard``, per-rank files) is refused at its first step: with
``plan_sync`` ``verify`` or ``broadcast`` (the default on several ranks) the ranks compare
a fingerprint of every global batch — ids, token counts, loss tokens and each sample's
first token ids — and raise on every rank when they differ, or when one rank's stream
ends before another's.

Resuming: the state is the number of stream samples consumed by finished steps (plus
epoch and step counters) and a fingerprint of those samples' token counts. Resuming
skips exactly that many samples — checking the fingerprint on the way and refusing a
stream that differs or ends first — and continues with the next one, so no sample is
lost or repeated, provided the stream yields the same samples in the same order when
iterated again (a fixed file order, or a seeded shuffle: Hugging Face
``IterableDataset.set_epoch`` is called with the epoch). Sample order is the stream's
own: ``shuffle``/``seed`` of the config do not reorder a stream.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from strategies.plan import StepPlan

from .agreement import PlanBatch, rank_plan_for
from .batch import StepBatch, cut_sample
from .collate import Collator
from .config import SamplerConfig, SamplerStats
from .distributed import group_timeout_s, plan_group, rank_and_world, resolve_sync
from .lengths import IGNORE_INDEX
from .planning import PlanStream, PlanSyncError
from .spec import MicroBatchSpec
from .state import STATE_VERSION, LengthsHash, Position, SavedState, balancer_state, read_stream_state

__all__ = ["PIECE_ID_BASE", "StreamingSteps"]

PIECE_ID_BASE = 1 << 48
"""Plan ids of split pieces after the first, in streaming mode (stream positions stay below it)."""
_CLOSE_TIMEOUT = 30.0
"""Seconds a broken-off iteration waits for its planning thread to finish the stop exchange."""
_END = object()
"""Sentinel: the stream has no next sample."""
_KEY_TOKENS = 8
"""Leading token ids per sample that enter the batch fingerprint (with the last one)."""
STREAM_HINT = (
    "every rank must read the same, complete stream in the same order. Do not split it per rank "
    "(datasets.distributed.split_dataset_by_node, IterableDataset.shard, per-rank files): the plan assigns samples "
    "to ranks. Seed any shuffle identically on every rank"
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
        self.max_length = int(config.max_length or balancer.max_sequence_length)
        if self.max_length > int(balancer.max_sequence_length):
            raise ValueError(
                f"max_length={self.max_length} tokens is above the balancer's largest capacity {int(balancer.max_sequence_length)}"
            )
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.stats = SamplerStats()
        self.epoch = 0
        self._consumed = 0
        self._consumed_fingerprint = LengthsHash().hexdigest()
        self._step_in_epoch = 0
        self._global_step = 0
        self._stream: PlanStream[tuple[StepBatch, int, str]] | None = None
        self._last_strategy: str | None = getattr(balancer, "previous_strategy", None)
        self._group = plan_group(self._sync, process_group, config.sync_timeout_s)
        self._timeout_s = group_timeout_s(self._group)

    # -- reading --------------------------------------------------------------------------------
    def _source(self, epoch: int, skip: int, expect: str, hashed: LengthsHash) -> Iterator[Any]:
        """The epoch's stream after its first ``skip`` samples, whose token counts must hash to ``expect``."""
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        it = iter(self.dataset)
        for pos in range(skip):
            sample = next(it, _END)
            if sample is _END:
                raise ValueError(
                    f"cannot resume: the state says {skip} samples of epoch {epoch}'s stream were consumed, but the "
                    f"stream ends after {pos}; it is not the stream the state was saved on (resume on the same stream, "
                    "or start the epoch again with set_epoch)"
                )
            hashed.update(self._measure(sample, pos)[0])
        if skip and hashed.hexdigest() != expect:
            raise ValueError(
                f"cannot resume: the first {skip} samples of epoch {epoch}'s stream differ from those the state was "
                f"saved on (their token counts hash to {hashed.hexdigest()!r}, the state says {expect!r}): another "
                "stream, order or tokenisation. Resume on the same stream in the same order, or start the epoch again "
                "with set_epoch"
            )
        return it

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

    def _batches(self, epoch: int, at: Position, skip: int, expect: str) -> Iterator[PlanBatch]:
        cfg = self.config
        pending: list[tuple[int, Any, list[tuple[int, int]], np.ndarray | None]] = []
        acc = 0
        budget = cfg.tokens_per_step or 0
        step, in_epoch = at.global_step, at.step_in_epoch
        hashed = LengthsHash()
        emitted = 0

        def emit(end: int) -> PlanBatch:
            ids, lens, loss, where, content = [], [], [], {}, []
            extra = 0
            for pos, sample, pieces, carries in pending:
                tokens = sample[self.input_key] if isinstance(sample, Mapping) else sample
                content.append(_token_key(tokens))
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
                meta=(epoch, in_epoch, end, where, hashed.hexdigest()),
                content=b"".join(content),
            )

        pos = skip - 1
        for pos, sample in enumerate(self._source(epoch, skip, expect, hashed), start=skip):
            if pos >= PIECE_ID_BASE:
                raise ValueError(f"stream epoch longer than {PIECE_ID_BASE} samples; start a new epoch earlier")
            n, carries = self._measure(sample, pos)
            pieces = self._pieces(n, pos)
            self.stats.num_samples = pos + 1
            if not pieces:
                hashed.update(n)
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
                yield emit(pos)  # every sample before ``pos`` is now in a batch or dropped (and hashed)
                emitted += 1
                pending, acc = [], 0
                step, in_epoch = step + 1, in_epoch + 1
            hashed.update(n)
            pending.append((pos, sample, pieces, carries))
            acc += tokens
        if pending:
            partial = cfg.tokens_per_step is not None or len(pending) < int(cfg.sequences_per_step or 0)
            if cfg.drop_last and partial:
                self.stats.dropped_last_samples += len(pending)
            else:
                yield emit(pos + 1)
                emitted += 1
        if emitted == 0 and skip == 0:
            raise ValueError(self._no_steps_reason(epoch, pos + 1, len(pending)))

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
    def _build(self, batch: PlanBatch, plan: StepPlan) -> tuple[StepBatch, int, str]:
        """This rank's collated step, the stream position after the batch and the fingerprint up to it."""
        epoch, in_epoch, end, where, consumed_fingerprint = batch.meta
        rank_plan = rank_plan_for(batch, plan, self.rank, self.world_size)
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
        return step, end, consumed_fingerprint

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
            epoch, skip, before = self.epoch, self._consumed, self._global_step
            yield from self._epoch(epoch, skip)
            # A state saved after an epoch's last step resumes with nothing left of that epoch:
            # continue with the next one (as the map-style sampler does), not with an empty iteration.
            if self._global_step != before or skip == 0 or self.epoch == epoch:
                return

    def _epoch(self, epoch: int, skip: int) -> Iterator[StepBatch]:
        at = Position(epoch, self._step_in_epoch, self._global_step)
        stream = PlanStream(
            self.balancer,
            self._batches(epoch, at, skip, self._consumed_fingerprint),
            self._build,
            depth=self.config.plan_ahead,
            sync=self._sync,
            group=self._group,
            rank=self.rank,
            first_step=at.global_step,
            data_hint=STREAM_HINT,
            timeout_s=self._timeout_s,
        )
        self._stream = stream
        try:
            for item, end, fingerprint in stream:
                self._consumed, self._consumed_fingerprint = end, fingerprint
                self._step_in_epoch, self._global_step = item.step_in_epoch + 1, item.step + 1
                self._last_strategy = item.plan.strategy
                yield item
            if stream.completed:
                self.epoch, self._step_in_epoch = epoch + 1, 0
                self._consumed, self._consumed_fingerprint = 0, LengthsHash().hexdigest()
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
            self._consumed, self._consumed_fingerprint = 0, LengthsHash().hexdigest()

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
        """Samples consumed by finished steps of the current epoch and their fingerprint, plus counters (module docstring)."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            **Position(self.epoch, self._step_in_epoch, self._global_step).to_dict(),
            "samples_consumed": self._consumed,
            "consumed_fingerprint": self._consumed_fingerprint,
            "world_size": self.world_size,
            "batching": self._batching(),
        }
        child = balancer_state(self.balancer, self._last_strategy)
        if child is not None:
            state["balancer"] = child
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check every field now; the skipped samples are checked against the fingerprint when iteration starts."""
        saved = read_stream_state(state, batching=self._batching())
        self.max_length = self._resume_cap(saved)
        at = saved.position
        self.epoch, self._step_in_epoch, self._global_step = at.epoch, at.step_in_epoch, at.global_step
        self._consumed, self._consumed_fingerprint = saved.samples_consumed, saved.consumed_fingerprint
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


def _token_key(tokens: Any) -> bytes:
    """A sample's first few token ids and its last one, as bytes (enough to tell two streams apart)."""
    n = len(tokens)
    head = [int(t) for t in tokens[: min(n, _KEY_TOKENS)]]
    head.append(int(tokens[n - 1]))
    return np.asarray(head, dtype=np.int64).tobytes()
