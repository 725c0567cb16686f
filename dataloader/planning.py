"""Background planning with cross-rank agreement.

:class:`PlanStream` turns a sequence of global batches into built steps, ``depth`` steps
ahead of the consumer, in one background thread. With ``sync``:

* ``"none"``: every rank plans on its own and nothing is exchanged or checked (one
  process, or ranks the caller guarantees identical data);
* ``"verify"``: every rank plans and builds its step, then all ranks all-gather a
  fingerprint of their global batch and their plan digest;
* ``"broadcast"``: rank 0 plans and broadcasts the plan with its batch fingerprint;
  every rank checks the fingerprint against its own batch, builds its step, and all
  ranks all-gather the outcome (required when ``Balancer.observe`` feeds measured
  times back, because which plan sees an observation depends on timing).

Every exchange ends with one all-gather of each rank's outcome for the step — built, end
of data, stopped (``break``/``close``) or failed (reading, planning or building) — and
every rank takes the same decision from it: continue, stop, or raise on *every* rank.
A rank that fails raises its own error; its peers raise :class:`PlanSyncError` naming
it. Ranks whose global batches differ (another seed, data order or dataset; a per-rank
shard of a stream) raise :class:`PlanSyncError` on every rank at the first such step,
before anything from it is trained. The exchange runs on a dedicated gloo group whose
timeout is the job's (see :func:`dataloader.distributed.plan_group`): a peer that died
or stopped without telling is noticed within that time, never later.

``pace`` (optional): an event the consumer sets while it is busy with something other
than taking data (the training step) and clears when it comes back. The thread then
starts each further plan while the event is set — planning overlaps the training step
instead of competing for the GIL with the consumer's own data handling — or as soon as
the consumer has nothing planned left, so it never waits on the gate.
"""

from __future__ import annotations

import collections
import queue
import threading
from typing import Any, Callable, Generic, Iterator, TypeVar

import numpy as np

from strategies.plan import StepPlan

from .agreement import DATA_HINT, END, ERROR, OK, STOP, PlanBatch, batch_fingerprint
from .plan_exchange import QUIT, SAME_STEPS, CollectiveTimes, PlanExchange, PlanSyncError, RoundOutcome

__all__ = ["PLAN_SYNC_MODES", "PlanBatch", "PlanStream", "PlanSyncError"]

PLAN_SYNC_MODES = ("none", "verify", "broadcast")

T = TypeVar("T")


_DONE = object()
_PACE_POLL = 0.002
"""Seconds between checks of the consumer's queue while waiting for its training step (``pace``)."""


class PlanStream(Generic[T]):
    """Iterator over ``build(batch, plan)`` for each batch, planned ahead in a thread (module docstring).

    ``stats`` (optional, a :class:`~dataloader.config.SamplerStats`) receives the wall time of
    the plan group's collectives (``collective_seconds``).

    For subclasses in this package (:class:`~dataloader.stream_shards.ShardRounds`): override
    :meth:`rounds`, and use :attr:`balancer`, :attr:`build`, :attr:`exchange` (the collectives
    and the decision of every round) and :attr:`next_step`. The thread, its queue and the
    ``pace`` gate stay this class's own.
    """

    def __init__(
        self,
        balancer: Any,
        batches: Iterator[PlanBatch],
        build: Callable[[PlanBatch, StepPlan], T],
        *,
        depth: int = 2,
        sync: str = "none",
        group: Any = None,
        rank: int = 0,
        pace: threading.Event | None = None,
        first_step: int = 0,
        data_hint: str = DATA_HINT,
        timeout_s: float | None = None,
        stats: CollectiveTimes | None = None,
    ) -> None:
        if sync not in PLAN_SYNC_MODES:
            raise ValueError(f"plan sync {sync!r}: choose one of {list(PLAN_SYNC_MODES)}")
        if depth < 1:
            raise ValueError(f"plan-ahead depth={depth} must be >= 1 step")
        self.balancer = balancer
        """The :class:`~balancer.selector.Balancer` that plans every step."""
        self.build = build
        """``build(batch, plan)``: this rank's item of a step (run in the planning thread)."""
        self._batches = batches
        self._depth = depth
        self._pace = pace
        self.next_step = first_step
        """Global step of the next round (a subclass's :meth:`rounds` advances it)."""
        self._out: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._abandoned = threading.Event()
        self.exchange = PlanExchange(
            sync=sync, group=group, rank=rank, stopping=self._abandoned, data_hint=data_hint, timeout_s=timeout_s, stats=stats
        )
        """The plan group's collectives and every round's decision (its ``stopping``: this rank was closed)."""
        self.completed = False
        """True once every batch was planned and consumed (not after :meth:`close`)."""
        self._thread = threading.Thread(target=self._run, name="hydraulis-plan-stream", daemon=True)
        self._thread.start()

    # -- consumer side ------------------------------------------------------------------------
    def __iter__(self) -> "PlanStream[T]":
        return self

    def __next__(self) -> T:
        while True:
            try:
                kind, value = self._out.get(timeout=0.1)
                break
            except queue.Empty:
                if self._abandoned.is_set() or not self._thread.is_alive():
                    if self._out.empty():
                        raise StopIteration from None
        if kind == "item":
            return value
        if kind == "error":
            raise value
        self.completed = True
        raise StopIteration

    def close(self) -> None:
        """Stop planning; peers are told at the next exchange. Does not wait for the thread."""
        self._abandoned.set()

    def join(self, timeout: float = 120.0) -> None:
        """Wait until the thread has stopped (after :meth:`close`, or at the end of the batches).

        Needed before a new stream plans on the same balancer and process group: the old
        thread may still be exchanging its ``stop`` message with the peers.
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise PlanSyncError(
                f"the planning thread did not stop within {timeout:.0f} s; a peer rank is probably still "
                "iterating (every rank must stop and restart iteration together)"
            )

    # -- background thread --------------------------------------------------------------------
    def _wait_for_turn(self) -> None:
        """With ``pace``: wait until the consumer trains (event set) or has no plan left, or we are closed."""
        pace = self._pace
        if pace is None:
            return
        while not (pace.is_set() or self._out.empty() or self._abandoned.is_set()):
            pace.wait(_PACE_POLL)

    def _emit(self, kind: str, value: Any) -> None:
        while not self._abandoned.is_set():
            try:
                self._out.put((kind, value), timeout=0.05)
                return
            except queue.Full:
                continue

    def _computed_plans(self) -> tuple[Iterator[StepPlan], collections.deque[PlanBatch]]:
        pulled: collections.deque[PlanBatch] = collections.deque()

        def feed() -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
            for b in self._batches:
                pulled.append(b)
                yield (b.step, b.lengths, b.ids, b.loss_tokens)

        return self.balancer.prefetch(feed(), depth=self._depth), pulled

    def _pull(self, source: Iterator[tuple[PlanBatch, StepPlan | None]]) -> RoundOutcome:
        if self._abandoned.is_set():
            return RoundOutcome(STOP, self.next_step)
        try:
            batch, plan = next(source)
        except StopIteration:
            return RoundOutcome(END, self.next_step)
        except BaseException as e:  # reading or planning failed here: the peers are told in the round
            return RoundOutcome(ERROR, self.next_step, error=e)
        self.next_step = batch.step + 1
        return RoundOutcome(OK, batch.step, batch, plan)

    def _run(self) -> None:
        rounds = self.rounds()
        try:
            while True:
                self._wait_for_turn()
                item = next(rounds, _DONE)
                if item is _DONE:  # the end of the data, or a stop every rank agreed on (then nobody listens)
                    self._emit("done", None)
                    return
                self._emit("item", item)
        except BaseException as e:
            self._emit("error", e)
        finally:
            rounds.close()

    def rounds(self) -> Iterator[T]:
        """Every step's item, one round of agreement each; returns at the end of the data (on every rank) or
        when this rank stopped together with its peers; raises (on every rank alike) when they disagree.

        Runs in the planning thread, which waits for the ``pace`` gate before each next item. Subclasses in
        this package override it to read, plan and exchange otherwise (per-rank shares).
        """
        plans: Iterator[StepPlan] | None = None
        try:
            if self.exchange.sync != "broadcast" or self.exchange.rank == 0:
                plans, pulled = self._computed_plans()
                source: Iterator[tuple[PlanBatch, StepPlan | None]] = _zip_plans(plans, pulled)
            else:
                source = ((b, None) for b in self._batches)
            while True:
                result = self._round(self._pull(source))
                if result is QUIT or result is END:
                    return
                yield result
        finally:
            close = getattr(plans, "close", None)
            if close is not None:
                close()

    # -- one round of agreement -------------------------------------------------------------------
    def _round(self, local: RoundOutcome) -> Any:
        """This step's built item, ``END`` or ``QUIT``; raises (on every rank alike) when the ranks disagree."""
        if self.exchange.sync == "none":
            if local.kind == ERROR:
                raise local.error  # type: ignore[misc]
            if local.kind != OK:
                return END if local.kind == END else QUIT
            return self.build(local.batch, local.plan)  # type: ignore[arg-type]
        fingerprint = batch_fingerprint(local.batch) if local.batch is not None else ""
        if self.exchange.sync == "broadcast":
            try:
                self._receive_plan(local, fingerprint)
            except _Quit:
                return QUIT
        item: Any = None
        if local.kind == OK and local.plan is not None:
            try:
                item = self.build(local.batch, local.plan)  # type: ignore[arg-type]
            except BaseException as e:  # a build error is exchanged like a planning error
                local.kind, local.error = ERROR, e
        digest = local.plan.digest.removeprefix("sha256:") if self.exchange.sync == "verify" and local.plan is not None else ""
        got = self.exchange.gather_outcomes(local, fingerprint, digest)
        return self.exchange.decide(got, local, item)

    def _receive_plan(self, local: RoundOutcome, fingerprint: str) -> None:
        """Broadcast mode: rank 0 sends its outcome and plan; the others take the plan if their batch matches."""
        import torch.distributed as dist

        if self.exchange.rank == 0:
            payload = ""
            if local.kind == OK:
                payload = local.plan.to_json()  # type: ignore[union-attr]
            elif local.kind == ERROR:
                payload = f"{type(local.error).__name__}: {local.error}"
            box: list[Any] = [(local.kind, local.step, fingerprint, payload)]
        else:
            box = [None]
        src = dist.get_global_rank(self.exchange.group, 0)
        self.exchange.collective(lambda: dist.broadcast_object_list(box, src=src, group=self.exchange.group), "broadcast", local.step)
        kind, step, root_fingerprint, payload = box[0]
        if kind == ERROR:
            if local.kind == ERROR:
                raise local.error  # type: ignore[misc]
            raise PlanSyncError(f"rank 0 failed at step {step}: {payload}; this rank stops too")
        if kind == STOP:
            if self._abandoned.is_set():
                raise _Quit
            raise PlanSyncError(f"rank 0 stopped iterating at step {step} while this rank continued; {SAME_STEPS}")
        if self.exchange.rank != 0 and local.kind == OK:
            # A batch that differs from rank 0's is not built: the all-gather below reports it on every rank.
            try:
                local.plan = StepPlan.from_json(payload) if kind == OK and root_fingerprint == fingerprint else None
            except Exception as e:  # noqa: BLE001 - reported in the all-gather like any local failure
                local.kind, local.error = ERROR, e


class _Quit(Exception):
    """Raised inside a round when rank 0 announced a stop that this rank asked for too."""


def _zip_plans(plans: Iterator[StepPlan], pulled: collections.deque[PlanBatch]) -> Iterator[tuple[PlanBatch, StepPlan]]:
    for plan in plans:
        batch = pulled.popleft()
        if plan.step != batch.step:
            raise PlanSyncError(f"planner returned step {plan.step} for batch of step {batch.step}")
        yield batch, plan
