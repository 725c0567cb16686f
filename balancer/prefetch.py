"""Planning ahead in a background thread, in batch order, with speeds fixed at request time.

Used by :meth:`balancer.selector.Balancer.prefetch`. The consumer's thread *requests*
each plan (handing the planner state current at that moment: per-rank speeds and the
tables built for them), so ranks that interleave ``next()`` and ``observe`` in the same
order plan with the same speeds; the worker thread only computes.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, TypeVar

from strategies.plan import StepPlan

__all__ = ["plan_ahead"]

State = TypeVar("State")


def plan_ahead(
    plan: Callable[[State, Any, Any, Any, Any], StepPlan],
    current_state: Callable[[], State],
    source: Iterator[tuple[Any, ...]],
    depth: int,
) -> Iterator[StepPlan]:
    """Yield ``plan(state, step, lengths, sample_ids, loss_tokens)`` for every batch of ``source``.

    ``source`` yields ``(step, lengths, sample_ids[, loss_tokens])``; at most ``depth``
    plans are computed ahead of the consumer. An exception from the source or from
    planning is raised to the consumer at the plan where it occurred; closing the
    iterator stops the thread.
    """
    requests: queue.Queue[Any] = queue.Queue()
    results: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth + 1)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        while True:
            state = requests.get()
            if state is done or stop.is_set():
                return
            try:
                item = next(source)
            except StopIteration:
                results.put(("done", None))
                return
            except BaseException as e:  # handed to the consumer, which re-raises it
                results.put(("error", e))
                return
            try:
                if not isinstance(item, tuple) or len(item) not in (3, 4):
                    raise ValueError(
                        f"prefetch: each batch must be (step, lengths, sample_ids[, loss_tokens]), got {type(item).__name__}"
                    )
                loss = item[3] if len(item) == 4 else None
                results.put(("plan", plan(state, item[0], item[1], item[2], loss)))
            except BaseException as e:
                results.put(("error", e))
                return

    thread = threading.Thread(target=worker, name="hydraulis-balancer-prefetch", daemon=True)
    thread.start()
    try:
        for _ in range(depth):
            requests.put(current_state())
        while True:
            kind, value = results.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            requests.put(current_state())
            yield value
    finally:
        stop.set()
        requests.put(done)
        thread.join()
