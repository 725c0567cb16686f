"""Per-rank streams (``stream_split='per_rank'``): every rank reads its own shard; the plan is made from all of them.

Each step, in the planning thread, every rank

1. reads its **share** of the step from its own stream by the budget rule with the local
   budget (``tokens_per_step // world_size`` tokens, or ``sequences_per_step / world_size``
   samples); a rank whose stream has ended contributes nothing;
2. all-gathers what it holds (**G1**, ``all_gather_object``): its outcome (read, stream ended,
   stopped, failed), its stream position and fingerprint, and per sequence ``(position,
   start, end, loss tokens, sample length)`` (40 bytes; about 260 more per rank, pickled).
   Every rank merges the shares rank-major into the identical global batch: sample ``p`` of rank ``r``'s stream
   gets id ``p * world_size + r`` (pieces of split samples after the first ``2**48 + k``,
   numbered in that order). The epoch ends when every rank's stream has ended;
3. plans it (``verify``: every rank; ``broadcast``: rank 0, which broadcasts the plan);
4. all-gathers each rank's planning outcome, plan digest and the bytes it will send to
   every other rank (**G2**), so a planning error stops every rank before data moves;
5. sends every sample to the ranks whose micro-batches hold it (one ``all_to_all_single``
   of pickled samples: a rank receives the samples of its micro-batches that other ranks
   read — tensor-parallel peers each receive their replica's — and nothing else);
6. collates its micro-batches and all-gathers the outcome (**G3**, as in
   :class:`~dataloader.planning.PlanStream`): a collate error is raised on every rank.

All collectives run on the loader's plan group (gloo, the job's timeout), in the same
order on every rank, from this one thread: a rank that stops (``break``) says so in G1
and every rank stops at the same step. Planning therefore happens here, step by step,
not in ``Balancer.prefetch``'s own thread (which reads batches ahead, on rank 0 only under
``broadcast``, and would interleave the exchanges differently across ranks); the thread
still runs ``plan_ahead`` steps ahead of the training loop.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from strategies.plan import StepPlan

from .agreement import END, ERROR, OK, STOP, PlanBatch, batch_fingerprint, rank_plan_for
from .plan_exchange import SAME_STEPS, PlanSyncError, RoundOutcome
from .planning import PlanStream
from .stream_read import PIECE_ID_BASE, Row, Share, StreamReader

__all__ = ["ShardMeta", "ShardRounds", "merge_shares", "shard_budget"]

_STOPPED, _ENDED = object(), object()
"""Round results: this rank stopped and its peers know; every rank's stream has ended."""


def shard_budget(tokens_per_step: int | None, sequences_per_step: int | None, world_size: int) -> tuple[int | None, int | None]:
    """Each rank's share of the global budget: ``(tokens, sequences)`` per rank and step."""
    if sequences_per_step is not None:
        if sequences_per_step % world_size:
            lo = max(world_size, sequences_per_step // world_size * world_size)
            raise ValueError(
                f"stream_split='per_rank': sequences_per_step={sequences_per_step} is not a multiple of world_size="
                f"{world_size}; every rank reads sequences_per_step / world_size samples per step. Use {lo} or {lo + world_size}"
            )
        return None, sequences_per_step // world_size
    assert tokens_per_step is not None
    if tokens_per_step < world_size:
        raise ValueError(f"stream_split='per_rank': tokens_per_step={tokens_per_step} is below world_size={world_size}; every rank needs a budget of >= 1 token")
    return tokens_per_step // world_size, None


@dataclass(frozen=True, slots=True)
class ShardMeta:
    """What one rank tells the others in G1 (pickled: 40 bytes per sequence plus about 260)."""

    kind: str
    step: int
    rows: np.ndarray
    """int64[n, 5]: ``(position, start, end, loss_tokens, full_length)`` of each sequence of its share."""
    end: int
    """Its stream position after the share (samples of the epoch's stream read into steps or dropped)."""
    fingerprint: str
    """:class:`~dataloader.state.LengthsHash` of the token counts of its stream up to ``end``."""
    read: int
    """Samples of its stream read this epoch (for the error when no rank has any)."""
    error: str = ""


def merge_shares(step: int, metas: list[ShardMeta], local: Share | None, rank: int) -> tuple[PlanBatch, dict[int, Row]]:
    """The global batch (rank-major) and each plan id's row; only this rank's own rows carry their sample."""
    world = len(metas)
    mine = {pos: sample for pos, sample, _, _ in local.items} if local is not None else {}
    ids, lens, loss, where = [], [], [], {}
    extra = 0
    for r, meta in enumerate(metas):
        previous = -1
        for pos, lo, hi, lt, n in meta.rows.tolist():
            sid = pos * world + r
            pid = sid if pos != previous else PIECE_ID_BASE + extra
            extra += pos == previous
            previous = pos
            ids.append(pid)
            lens.append(hi - lo)
            loss.append(lt)
            where[pid] = Row(sid, mine.get(pos) if r == rank else None, lo, hi, lt, n)
    batch = PlanBatch(
        step=step,
        lengths=np.asarray(lens, dtype=np.int64),
        ids=np.asarray(ids, dtype=np.int64),
        loss_tokens=np.asarray(loss, dtype=np.int64),
    )
    return batch, where


class ShardRounds(PlanStream):
    """:class:`PlanStream` over per-rank shares (module docstring): yields ``build(batch, plan)`` per step.

    ``build`` receives a :class:`PlanBatch` whose ``meta`` is ``(where, positions)``: each plan
    id's :class:`Row` (this rank's micro-batches' samples filled in) and every rank's
    ``(stream position, fingerprint)`` after the step. It overrides :meth:`PlanStream.rounds`
    and uses only PlanStream's subclass interface (``balancer``, ``build``, ``exchange``,
    ``next_step``). ``reader.stats`` receives ``exchange_seconds`` and
    ``received_sample_bytes``; pass the same stats to count ``collective_seconds``.
    """

    def __init__(
        self,
        balancer: Any,
        reader: StreamReader,
        shares: Iterator[Share],
        build: Callable[[PlanBatch, StepPlan], Any],
        *,
        world_size: int,
        start: tuple[int, str],
        first_step: int,
        resumed: bool,
        epoch: int,
        **kwargs: Any,
    ) -> None:
        self._reader, self._shares = reader, shares
        self._world = world_size
        self._position = start
        self._resumed = resumed
        self._epoch = epoch
        self._ended = False
        self._steps = 0
        super().__init__(balancer, iter(()), build, first_step=first_step, **kwargs)

    def rounds(self) -> Iterator[Any]:
        """PlanStream's hook, run in its thread: plans here, in step (a plan needs its step's G1 first)."""
        while True:
            result = self._round_shares()
            if result is _STOPPED or result is _ENDED:
                return
            yield result

    # -- one step --------------------------------------------------------------------------------------
    def _read(self) -> tuple[RoundOutcome, Share | None]:
        step = self.next_step
        if self.exchange.stopping.is_set():
            return RoundOutcome(STOP, step), None
        if self._ended:
            return RoundOutcome(END, step), None
        try:
            share = next(self._shares)
        except StopIteration:
            self._ended = True
            return RoundOutcome(END, step), None
        except BaseException as e:  # noqa: BLE001 - reading failed here (a resume mismatch, a bad sample): told in G1
            return RoundOutcome(ERROR, step, error=e), None
        self._position = (share.end, share.fingerprint)
        return RoundOutcome(OK, step), share

    def _round_shares(self) -> Any:
        mine, share = self._read()
        rows = np.asarray(share.rows(), dtype=np.int64).reshape(-1, 5) if share is not None else np.zeros((0, 5), np.int64)
        read = self._reader.read
        text = f"{type(mine.error).__name__}: {mine.error}" if mine.error is not None else ""
        metas: list[ShardMeta] = self.exchange.gather(ShardMeta(mine.kind, mine.step, rows, *self._position, read, text), mine.step)
        verdict = self._after_read(metas, mine)
        if verdict is not None:
            return verdict
        self.next_step, self._steps = mine.step + 1, self._steps + 1
        mine.kind = OK  # a rank whose stream has ended takes part in the step with nothing
        batch, where = merge_shares(mine.step, metas, share, self.exchange.rank)
        fingerprint = batch_fingerprint(batch)
        plan = self._plan(batch, mine)
        digest = plan.digest.removeprefix("sha256:") if self.exchange.sync == "verify" and plan is not None else ""
        cpu = time.thread_time()
        outgoing = self._outgoing(batch, plan, where) if plan is not None and mine.kind == OK else [b""] * self._world
        self._reader.stats.exchange_seconds += time.thread_time() - cpu
        text = f"{type(mine.error).__name__}: {mine.error}" if mine.error is not None else ""
        got = self.exchange.gather((mine.kind, mine.step, fingerprint, digest, text, [len(b) for b in outgoing]), mine.step)
        self.exchange.decide([g[:5] for g in got], mine, None)  # raises on every rank alike when a rank failed or disagrees
        cpu = time.thread_time()
        self._deliver(outgoing, [g[5] for g in got], where, mine.step)
        self._reader.stats.exchange_seconds += time.thread_time() - cpu
        positions = tuple((m.end, m.fingerprint) for m in metas)
        full = PlanBatch(batch.step, batch.lengths, batch.ids, batch.loss_tokens, meta=(where, positions))
        item: Any = None
        try:
            self._check_arrived(plan, where)  # type: ignore[arg-type]
            item = self.build(full, plan)  # type: ignore[arg-type]
        except BaseException as e:  # noqa: BLE001 - a collate error is exchanged like a planning error
            mine.kind, mine.error = ERROR, e
        if self.exchange.group is None:  # one rank: nothing to agree on
            return self.exchange.decide([(mine.kind, mine.step, fingerprint, digest, "")], mine, item)  # type: ignore[arg-type]
        return self.exchange.decide(self.exchange.gather_outcomes(mine, fingerprint, digest), mine, item)  # type: ignore[arg-type]

    def _after_read(self, metas: list[ShardMeta], mine: RoundOutcome) -> Any:
        """``None`` to go on with the step; ``_STOPPED``/``_ENDED``; or raises on every rank alike."""
        failed = [(r, m) for r, m in enumerate(metas) if m.kind == ERROR]
        if failed:
            if mine.error is not None:
                raise mine.error
            r, m = failed[0]
            raise PlanSyncError(f"rank {r} failed at step {m.step}: {m.error}; this rank stops too")
        stopped = [r for r, m in enumerate(metas) if m.kind == STOP]
        if stopped:
            if self.exchange.stopping.is_set():
                return _STOPPED
            raise PlanSyncError(
                f"rank(s) {stopped} stopped iterating at step {mine.step} while this rank continued; {SAME_STEPS}"
            )
        steps = sorted({m.step for m in metas})
        if len(steps) > 1:
            raise PlanSyncError(
                f"ranks are at different steps {steps} (this rank: {mine.step}); load the same state on every rank and "
                "call set_epoch with the same epoch everywhere"
            )
        if any(m.kind == OK for m in metas):
            return None
        if self._steps == 0 and not self._resumed:
            raise ValueError(
                f"no rank's stream had a sample to train on in epoch {self._epoch} (samples read per rank: "
                f"{[m.read for m in metas]}): every shard is empty, or overlong='drop' dropped every sample. Check how "
                "the stream is split and fed to the ranks, or raise max_length"
            )
        return _ENDED

    def _plan(self, batch: PlanBatch, mine: RoundOutcome) -> StepPlan | None:
        """The step's plan (``broadcast``: rank 0's); ``None`` when rank 0 failed (everyone stops in G2)."""
        plan: StepPlan | None = None
        if self.exchange.sync != "broadcast" or self.exchange.rank == 0:
            try:
                plan = self.balancer.plan(batch.lengths, step=batch.step, sample_ids=batch.ids, loss_tokens=batch.loss_tokens)
            except BaseException as e:  # noqa: BLE001 - reported in G2 like any local failure
                mine.kind, mine.error = ERROR, e
        if self.exchange.sync == "broadcast" and self.exchange.group is not None:
            import torch.distributed as dist

            box: list[Any] = [plan.to_json() if plan is not None else None] if self.exchange.rank == 0 else [None]
            src = dist.get_global_rank(self.exchange.group, 0)
            self.exchange.collective(lambda: dist.broadcast_object_list(box, src=src, group=self.exchange.group), "broadcast", batch.step)
            if self.exchange.rank != 0 and box[0] is not None:
                try:
                    plan = StepPlan.from_json(box[0])
                except Exception as e:  # noqa: BLE001 - reported in G2
                    mine.kind, mine.error = ERROR, e
        if plan is not None and mine.kind == OK:
            try:
                rank_plan_for(batch, plan, self.exchange.rank, self._world)
            except ValueError as e:
                mine.kind, mine.error = ERROR, e
        return plan

    # -- moving samples --------------------------------------------------------------------------------
    def _outgoing(self, batch: PlanBatch, plan: StepPlan, where: dict[int, Row]) -> list[bytes]:
        """Pickled ``[(sample id, sample), ...]`` this rank sends to each rank (``b""``: nothing)."""
        out = [b""] * self._world
        for dest in range(self._world):
            if dest == self.exchange.rank:
                continue
            held = {where[pid].sample_id: where[pid].sample for mb in plan.for_rank(dest).micro_batches for pid in mb}
            send = sorted((sid, s) for sid, s in held.items() if sid % self._world == self.exchange.rank)
            if send:
                out[dest] = pickle.dumps(send, protocol=pickle.HIGHEST_PROTOCOL)
        return out

    def _deliver(self, outgoing: list[bytes], sizes: list[list[int]], where: dict[int, Row], step: int) -> None:
        """One all-to-all of the pickled samples; fills in the rows of the samples this rank received."""
        if not any(any(s) for s in sizes):
            return
        import torch
        import torch.distributed as dist

        send = torch.frombuffer(bytearray(b"".join(outgoing)), dtype=torch.uint8) if any(outgoing) else torch.empty(0, dtype=torch.uint8)
        incoming = [sizes[src][self.exchange.rank] for src in range(self._world)]
        recv = torch.empty(sum(incoming), dtype=torch.uint8)
        self.exchange.collective(
            lambda: dist.all_to_all_single(recv, send, incoming, sizes[self.exchange.rank], group=self.exchange.group), "all-to-all", step
        )
        self._reader.stats.received_sample_bytes += recv.numel()
        data, at = recv.numpy().tobytes(), 0
        got: dict[int, Any] = {}
        for n in incoming:
            if n:
                got.update(pickle.loads(data[at : at + n]))
            at += n
        for pid, row in where.items():
            if row.sample is None and row.sample_id in got:
                where[pid] = row._replace(sample=got[row.sample_id])

    def _check_arrived(self, plan: StepPlan, where: dict[int, Row]) -> None:
        missing = [where[pid].sample_id for mb in plan.for_rank(self.exchange.rank).micro_batches for pid in mb if where[pid].sample is None]
        if missing:  # an internal invariant: the all-to-all delivers every sample of this rank's micro-batches
            raise RuntimeError(f"step {plan.step}: samples {missing[:8]} of this rank's micro-batches did not arrive from their ranks")
