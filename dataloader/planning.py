"""Background planning with cross-rank agreement.

:class:`PlanStream` turns a sequence of global batches into plans, ``depth`` steps ahead
of the consumer, in one background thread. With ``sync``:

* ``"none"``: every rank plans on its own (deterministic Balancer, no feedback);
* ``"verify"``: every rank plans, then all ranks all-gather the plan digests and stop
  with an error naming the step and the disagreeing ranks;
* ``"broadcast"``: rank 0 plans and broadcasts the plan; the others only receive
  (required when ``Balancer.observe`` feeds measured times back, because which plan
  sees an observation depends on timing).

``pace`` (optional): an event the consumer sets while it is busy with something other
than taking data (the training step) and clears when it comes back. The thread then
starts each further plan while the event is set — planning overlaps the training step
instead of competing for the GIL with the consumer's own data handling — or as soon as
the consumer has nothing planned left, so it never waits on the gate.

Collectives run in the background thread on a dedicated gloo group, so they never
interleave with the training loop's collectives. Every message is tagged with its step;
a rank that stops early (``break``) tells the others with a ``stop`` message at its
next exchange, and an error on one rank is raised on all of them, so no rank waits
forever on a peer.
"""

from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

import numpy as np

from strategies.plan import StepPlan

__all__ = ["PLAN_SYNC_MODES", "PlanBatch", "PlanStream", "PlanSyncError"]

PLAN_SYNC_MODES = ("none", "verify", "broadcast")

T = TypeVar("T")


class PlanSyncError(RuntimeError):
    """Ranks disagree on a plan, or a peer failed or stopped early."""


@dataclass(frozen=True, slots=True)
class PlanBatch:
    """One global batch to plan (every rank builds the same sequence of these)."""

    step: int
    """Global step number (passed to ``Balancer.plan``)."""
    lengths: np.ndarray
    """int64[n] tokens per sequence (piece)."""
    ids: np.ndarray
    """int64[n] sequence ids (sample ids, or piece ids for split samples)."""
    loss_tokens: np.ndarray
    """int64[n] loss-carrying tokens per sequence."""
    meta: Any = None
    """Whatever the builder needs to turn the plan into this rank's work."""


_STOP = "stop"
_PACE_POLL = 0.002
"""Seconds between checks of the consumer's queue while waiting for its training step (``pace``)."""


class PlanStream(Generic[T]):
    """Iterator over ``build(batch, plan)`` for each batch, planned ahead in a thread."""

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
    ) -> None:
        if sync not in PLAN_SYNC_MODES:
            raise ValueError(f"plan sync {sync!r}: choose one of {list(PLAN_SYNC_MODES)}")
        if depth < 1:
            raise ValueError(f"plan-ahead depth={depth} must be >= 1 step")
        self._balancer = balancer
        self._batches = batches
        self._build = build
        self._depth = depth
        self._sync = sync
        self._group = group
        self._rank = rank
        self._pace = pace
        self._out: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._abandoned = threading.Event()
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

        return self._balancer.prefetch(feed(), depth=self._depth), pulled

    def _run(self) -> None:
        plans: Iterator[StepPlan] | None = None
        try:
            computes = self._sync != "broadcast" or self._rank == 0
            if computes:
                plans, pulled = self._computed_plans()
                source: Iterator[tuple[PlanBatch, StepPlan | None]] = _zip_plans(plans, pulled)
            else:
                source = ((b, None) for b in self._batches)
            while True:
                self._wait_for_turn()
                try:
                    batch, plan = next(source)
                except StopIteration:
                    self._emit("done", None)
                    return
                except BaseException as e:  # a local planning error: tell the peers, then raise here
                    self._exchange_failure(e)
                    self._emit("error", e)
                    return
                plan = self._exchange(batch, plan)
                if plan is None:  # a peer stopped early, or this rank did
                    return
                self._emit("item", self._build(batch, plan))
        except BaseException as e:
            self._emit("error", e)
        finally:
            close = getattr(plans, "close", None)
            if close is not None:
                close()

    # -- agreement ------------------------------------------------------------------------------
    def _exchange(self, batch: PlanBatch, plan: StepPlan | None) -> StepPlan | None:
        """Agree on ``batch``'s plan with the peers; ``None`` when iteration must stop."""
        if self._sync == "none":
            return None if self._abandoned.is_set() else plan
        import torch.distributed as dist

        if self._sync == "broadcast":
            if self._rank == 0:
                msg = (_STOP, batch.step, "") if self._abandoned.is_set() else ("plan", batch.step, plan.to_json())  # type: ignore[union-attr]
            else:
                msg = None
            box = [msg]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self._group, 0), group=self._group)
            kind, step, payload = box[0]
            if kind == "error":
                raise PlanSyncError(f"rank 0 failed to plan step {step}: {payload}")
            if kind == _STOP:
                if not self._abandoned.is_set():
                    self._emit("error", PlanSyncError(f"rank 0 stopped iterating at step {step} while this rank continued"))
                return None
            if step != batch.step:
                raise PlanSyncError(f"plan broadcast out of order: received step {step}, expected {batch.step}")
            if self._abandoned.is_set():
                return self._exchange_after_stop(batch)
            return StepPlan.from_json(payload)

        # verify
        mine = (_STOP, batch.step, "") if self._abandoned.is_set() else ("plan", batch.step, plan.digest)  # type: ignore[union-attr]
        world = dist.get_world_size(self._group)
        got: list[Any] = [None] * world
        dist.all_gather_object(got, mine, group=self._group)
        errors = [(r, m) for r, m in enumerate(got) if m[0] == "error"]
        if errors:
            r, m = errors[0]
            raise PlanSyncError(f"rank {r} failed to plan step {m[1]}: {m[2]}")
        stopped = [r for r, m in enumerate(got) if m[0] == _STOP]
        if stopped:
            if not self._abandoned.is_set():
                self._emit("error", PlanSyncError(f"rank(s) {stopped} stopped iterating at step {batch.step} while this rank continued"))
            return None
        steps = {m[1] for m in got}
        if steps != {batch.step}:
            raise PlanSyncError(f"ranks are at different steps {sorted(steps)} (this rank: {batch.step})")
        digests = [m[2] for m in got]
        if len(set(digests)) != 1:
            groups: dict[str, list[int]] = {}
            for r, d in enumerate(digests):
                groups.setdefault(d, []).append(r)
            detail = "; ".join(f"ranks {rs}: {d[:19]}" for d, rs in groups.items())
            raise PlanSyncError(
                f"ranks derived different plans for step {batch.step} ({detail}); the Balancer must be deterministic "
                "on every rank (same config, candidates and observations) — use plan_sync='broadcast' otherwise"
            )
        return plan

    def _exchange_after_stop(self, batch: PlanBatch) -> None:
        """A non-root rank stopped while rank 0 still sends: drain until rank 0 stops or the epoch ends."""
        import torch.distributed as dist

        for b in self._batches:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=dist.get_global_rank(self._group, 0), group=self._group)
            if box[0][0] != "plan":
                return None
        return None

    def _exchange_failure(self, error: BaseException) -> None:
        if self._sync == "none":
            return
        import torch.distributed as dist

        msg = ("error", -1, f"{type(error).__name__}: {error}")
        try:
            if self._sync == "broadcast":
                if self._rank == 0:
                    dist.broadcast_object_list([msg], src=dist.get_global_rank(self._group, 0), group=self._group)
            else:
                got: list[Any] = [None] * dist.get_world_size(self._group)
                dist.all_gather_object(got, msg, group=self._group)
        except Exception:  # the peers may be gone already; the local error is what matters
            return


def _zip_plans(plans: Iterator[StepPlan], pulled: collections.deque[PlanBatch]) -> Iterator[tuple[PlanBatch, StepPlan]]:
    for plan in plans:
        batch = pulled.popleft()
        if plan.step != batch.step:
            raise PlanSyncError(f"planner returned step {plan.step} for batch of step {batch.step}")
        yield batch, plan
