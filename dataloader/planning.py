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
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

import numpy as np

from strategies.plan import StepPlan

from .agreement import (
    DATA_HINT,
    END,
    ERROR,
    OK,
    STOP,
    PlanBatch,
    batch_fingerprint,
    decode_outcome,
    describe_groups,
    encode_outcome,
    group_ranks,
)

__all__ = ["PLAN_SYNC_MODES", "PlanBatch", "PlanStream", "PlanSyncError"]

PLAN_SYNC_MODES = ("none", "verify", "broadcast")

T = TypeVar("T")


class PlanSyncError(RuntimeError):
    """Ranks disagree on a step (data, plan, or epoch length), or a peer failed or stopped early."""


_QUIT = object()
"""Round result: this rank stopped (``break``/``close``) and its peers know."""
_PACE_POLL = 0.002
"""Seconds between checks of the consumer's queue while waiting for its training step (``pace``)."""


@dataclass(slots=True)
class _Local:
    """This rank's outcome for one round before the exchange."""

    kind: str
    step: int
    batch: PlanBatch | None = None
    plan: StepPlan | None = None
    error: BaseException | None = None


class PlanStream(Generic[T]):
    """Iterator over ``build(batch, plan)`` for each batch, planned ahead in a thread (module docstring)."""

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
        self._next_step = first_step
        self._data_hint = data_hint
        self._timeout_s = timeout_s
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

    def _pull(self, source: Iterator[tuple[PlanBatch, StepPlan | None]]) -> _Local:
        if self._abandoned.is_set():
            return _Local(STOP, self._next_step)
        try:
            batch, plan = next(source)
        except StopIteration:
            return _Local(END, self._next_step)
        except BaseException as e:  # reading or planning failed here: the peers are told in the round
            return _Local(ERROR, self._next_step, error=e)
        self._next_step = batch.step + 1
        return _Local(OK, batch.step, batch, plan)

    def _run(self) -> None:
        plans: Iterator[StepPlan] | None = None
        try:
            if self._sync != "broadcast" or self._rank == 0:
                plans, pulled = self._computed_plans()
                source: Iterator[tuple[PlanBatch, StepPlan | None]] = _zip_plans(plans, pulled)
            else:
                source = ((b, None) for b in self._batches)
            while True:
                self._wait_for_turn()
                result = self._round(self._pull(source))
                if result is _QUIT:
                    return
                if result is END:
                    self._emit("done", None)
                    return
                self._emit("item", result)
        except BaseException as e:
            self._emit("error", e)
        finally:
            close = getattr(plans, "close", None)
            if close is not None:
                close()

    # -- one round of agreement -------------------------------------------------------------------
    def _round(self, local: _Local) -> Any:
        """This step's built item, ``END`` or ``_QUIT``; raises (on every rank alike) when the ranks disagree."""
        if self._sync == "none":
            if local.kind == ERROR:
                raise local.error  # type: ignore[misc]
            if local.kind != OK:
                return END if local.kind == END else _QUIT
            return self._build(local.batch, local.plan)  # type: ignore[arg-type]
        fingerprint = batch_fingerprint(local.batch) if local.batch is not None else ""
        if self._sync == "broadcast":
            try:
                self._receive_plan(local, fingerprint)
            except _Quit:
                return _QUIT
        item: Any = None
        if local.kind == OK and local.plan is not None:
            try:
                item = self._build(local.batch, local.plan)  # type: ignore[arg-type]
            except BaseException as e:  # a build error is exchanged like a planning error
                local.kind, local.error = ERROR, e
        digest = local.plan.digest.removeprefix("sha256:") if self._sync == "verify" and local.plan is not None else ""
        got = self._gather_outcomes(local, fingerprint, digest)
        return self._decide(got, local, item)

    def _receive_plan(self, local: _Local, fingerprint: str) -> None:
        """Broadcast mode: rank 0 sends its outcome and plan; the others take the plan if their batch matches."""
        import torch.distributed as dist

        if self._rank == 0:
            payload = ""
            if local.kind == OK:
                payload = local.plan.to_json()  # type: ignore[union-attr]
            elif local.kind == ERROR:
                payload = f"{type(local.error).__name__}: {local.error}"
            box: list[Any] = [(local.kind, local.step, fingerprint, payload)]
        else:
            box = [None]
        src = dist.get_global_rank(self._group, 0)
        self._collective(lambda: dist.broadcast_object_list(box, src=src, group=self._group), "broadcast", local.step)
        kind, step, root_fingerprint, payload = box[0]
        if kind == ERROR:
            if local.kind == ERROR:
                raise local.error  # type: ignore[misc]
            raise PlanSyncError(f"rank 0 failed at step {step}: {payload}; this rank stops too")
        if kind == STOP:
            if self._abandoned.is_set():
                raise _Quit
            raise PlanSyncError(f"rank 0 stopped iterating at step {step} while this rank continued; {_SAME_STEPS}")
        if self._rank != 0 and local.kind == OK:
            # A batch that differs from rank 0's is not built: the all-gather below reports it on every rank.
            try:
                local.plan = StepPlan.from_json(payload) if kind == OK and root_fingerprint == fingerprint else None
            except Exception as e:  # noqa: BLE001 - reported in the all-gather like any local failure
                local.kind, local.error = ERROR, e

    def _gather_outcomes(self, local: _Local, fingerprint: str, digest: str) -> list[tuple[Any, ...]]:
        """Every rank's ``(kind, step, fingerprint, digest, error text)``: one all-gather of 64 bytes per rank,
        and a second one, of the error texts, only when some rank failed."""
        import torch
        import torch.distributed as dist

        mine = torch.from_numpy(encode_outcome(local.kind, local.step, fingerprint, digest))
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(self._group))]
        self._collective(lambda: dist.all_gather(parts, mine, group=self._group), "all-gather", local.step)
        got = [decode_outcome(p.numpy()) for p in parts]
        texts = [""] * len(got)
        if any(m[0] == ERROR for m in got):
            text = f"{type(local.error).__name__}: {local.error}" if local.error is not None else ""
            self._collective(lambda: dist.all_gather_object(texts, text, group=self._group), "all-gather", local.step)
        return [(*m, t) for m, t in zip(got, texts)]

    def _collective(self, fn: Callable[[], Any], what: str, step: int) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a peer that died or never came: say so, on this rank
            limit = f"{self._timeout_s:g} s" if self._timeout_s is not None else "its timeout"
            raise PlanSyncError(
                f"plan exchange ({what}) of step {step} failed: {type(e).__name__}: {e}. A peer rank did not take part "
                f"within the plan group's timeout ({limit}): it probably failed or left the loop without "
                "loader.close() — see its own error. The timeout is the default process group's "
                "(init_process_group(timeout=...)) or the loader's sync_timeout_s"
            ) from e

    def _decide(self, got: list[tuple[Any, ...]], local: _Local, item: Any) -> Any:
        step = local.step
        errors = [(r, m) for r, m in enumerate(got) if m[0] == ERROR]
        if errors:
            if local.error is not None:
                raise local.error
            r, m = errors[0]
            raise PlanSyncError(f"rank {r} failed at step {m[1]}: {m[4]}; this rank stops too")
        stopped = [r for r, m in enumerate(got) if m[0] == STOP]
        if stopped:
            if self._abandoned.is_set():
                return _QUIT
            raise PlanSyncError(f"rank(s) {stopped} stopped iterating at step {step} while this rank continued; {_SAME_STEPS}")
        ended = [r for r, m in enumerate(got) if m[0] == END]
        if ended:
            if len(ended) == len(got):
                return END
            more = [r for r in range(len(got)) if r not in ended]
            raise PlanSyncError(
                f"ranks disagree on the epoch's length: rank(s) {ended} reached the end of their data at step {step} "
                f"while rank(s) {more} still have a batch; {self._data_hint}"
            )
        steps = sorted({m[1] for m in got})
        if len(steps) > 1:
            raise PlanSyncError(
                f"ranks are at different steps {steps} (this rank: {step}); load the same state on every rank and "
                "call set_epoch with the same epoch everywhere"
            )
        by_fingerprint = group_ranks([m[2] for m in got])
        if len(by_fingerprint) > 1:
            raise PlanSyncError(f"ranks hold different global batches for step {step} ({describe_groups(by_fingerprint)}): {self._data_hint}")
        by_digest = group_ranks([m[3] for m in got])
        if len(by_digest) > 1:
            raise PlanSyncError(
                f"ranks derived different plans for step {step} ({describe_groups(by_digest)}) from the same global batch: the "
                "Balancer differs across ranks (its config, candidates, cost model, or measured times fed to "
                "Balancer.observe). Build it identically on every rank, or use plan_sync='broadcast' (rank 0 plans for all)"
            )
        return item


class _Quit(Exception):
    """Raised inside a round when rank 0 announced a stop that this rank asked for too."""


_SAME_STEPS = "every rank must run the same steps (break on every rank, or call loader.close() on every rank)"


def _zip_plans(plans: Iterator[StepPlan], pulled: collections.deque[PlanBatch]) -> Iterator[tuple[PlanBatch, StepPlan]]:
    for plan in plans:
        batch = pulled.popleft()
        if plan.step != batch.step:
            raise PlanSyncError(f"planner returned step {plan.step} for batch of step {batch.step}")
        yield batch, plan
