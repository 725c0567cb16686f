"""Background planning of BalancedDataLoader: ahead of the consumer, bounded, resumable, and it always stops."""

from __future__ import annotations

import threading
import time
import types
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pytest
from test_dataloader import hf_dataset, make_balancer, sequences

from dataloader import BalancedDataLoader
from dataloader.planning import PlanBatch, PlanStream

PLANNING_THREADS = ("hydraulis-plan-stream", "hydraulis-balancer-prefetch")


class Recording:
    """A Balancer proxy that records the steps the planner pulled, and can fail at one of them."""

    def __init__(self, inner: Any, fail_at: int | None = None) -> None:
        self.inner = inner
        self.fail_at = fail_at
        self.pulled: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prefetch(self, batches: Iterable[tuple[Any, ...]], depth: int = 2) -> Iterator[Any]:
        def record() -> Iterator[tuple[Any, ...]]:
            for item in batches:
                if item[0] == self.fail_at:
                    raise RuntimeError(f"planner failed at step {item[0]}")
                self.pulled.append(int(item[0]))
                yield item

        return self.inner.prefetch(record(), depth=depth)


def planning_threads(before: set[threading.Thread]) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name in PLANNING_THREADS and t not in before and t.is_alive()]


def wait_until(cond: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_planning_runs_ahead_of_the_consumer_and_is_bounded() -> None:
    depth = 2
    rec = Recording(make_balancer(1))
    loader = BalancedDataLoader(hf_dataset(120, seed=3), balancer=rec, sequences_per_step=4, plan_ahead=depth)
    steps = len(loader)
    assert steps == 30
    it = iter(loader)
    first = next(it)
    assert first.step == 0
    # While the consumer holds step 0 (a training step runs), the planner works ahead ...
    assert wait_until(lambda: len(rec.pulled) >= 1 + depth), rec.pulled
    time.sleep(0.3)
    # ... but only a bounded number of steps: its queue (depth) + the balancer's look-ahead (depth)
    # + the step being handed over + the one the consumer holds + the one the DataLoader pulled next.
    assert len(rec.pulled) <= 2 * depth + 3 < steps, rec.pulled
    assert rec.pulled == list(range(len(rec.pulled)))  # in order, each once
    rest = [b.step for b in it]
    assert rest == list(range(1, steps))
    assert rec.pulled == list(range(steps))


@pytest.mark.parametrize(("num_workers", "plan_ahead"), [(2, 2), (0, 50)])
def test_resume_with_prefetch_yields_exactly_the_remaining_steps(num_workers: int, plan_ahead: int) -> None:
    ds = hf_dataset(90, seed=11)
    kw: dict[str, Any] = dict(tokens_per_step=450, seed=5, plan_ahead=plan_ahead, rank=1, world_size=2, plan_sync="none", num_workers=num_workers)
    reference = [sequences(b) for b in BalancedDataLoader(ds, balancer=make_balancer(2), **kw)]
    assert len(reference) > 6
    first = BalancedDataLoader(ds, balancer=make_balancer(2), **kw)
    it = iter(first)
    for _ in range(3):
        next(it)
    time.sleep(0.2)  # let the planner and the workers run well ahead of the consumer
    state = first.state_dict()
    assert state["sampler"]["step_in_epoch"] == 3
    del it
    resumed = BalancedDataLoader(ds, balancer=make_balancer(2), **kw)
    resumed.load_state_dict(state)
    assert [sequences(b) for b in resumed] == reference[3:]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_planning_threads_stop_on_break_del_and_exception(num_workers: int) -> None:
    before = set(threading.enumerate())
    loader = BalancedDataLoader(hf_dataset(80, seed=7), balancer=make_balancer(1), sequences_per_step=4, num_workers=num_workers)

    for i, _ in enumerate(loader):  # break
        if i == 1:
            break
    assert planning_threads(before) == []

    it = iter(loader)  # an unfinished iterator dropped
    next(it)
    assert wait_until(lambda: len(planning_threads(before)) == 2)
    del it
    assert wait_until(lambda: planning_threads(before) == [])

    def failing_loop() -> None:  # an exception in the training loop's body
        for _ in loader:
            raise KeyError("training step failed")

    with pytest.raises(KeyError):
        failing_loop()
    assert wait_until(lambda: planning_threads(before) == [])

    it = iter(loader)  # close() with an iterator still held
    next(it)
    loader.close(timeout=10)
    assert planning_threads(before) == []
    del it


def test_planner_error_reaches_the_consumer_and_stops_the_threads() -> None:
    before = set(threading.enumerate())
    rec = Recording(make_balancer(1), fail_at=2)
    loader = BalancedDataLoader(hf_dataset(40, seed=1), balancer=rec, sequences_per_step=4, plan_ahead=3)
    got: list[int] = []
    with pytest.raises(RuntimeError, match="planner failed at step 2"):
        for b in loader:
            got.append(b.step)
    assert got == [0, 1]  # every step planned before the failure is delivered first
    assert wait_until(lambda: planning_threads(before) == [])


class InlinePlanner:
    """A stand-in Balancer whose ``prefetch`` plans one batch per request, with no look-ahead of its own."""

    def prefetch(self, batches: Iterable[tuple[Any, ...]], depth: int = 2) -> Iterator[Any]:
        for item in batches:
            yield types.SimpleNamespace(step=int(item[0]))


def test_paced_planning_waits_for_the_training_step_but_never_starves_the_consumer() -> None:
    pulled: list[int] = []

    def batches() -> Iterator[PlanBatch]:
        for t in range(12):
            pulled.append(t)
            z = np.zeros(1, dtype=np.int64)
            yield PlanBatch(step=t, lengths=z + 1, ids=z, loss_tokens=z)

    pace = threading.Event()
    stream = PlanStream(InlinePlanner(), batches(), lambda b, p: b.step, depth=3, pace=pace)
    try:
        assert wait_until(lambda: len(pulled) == 1)
        time.sleep(0.2)
        assert len(pulled) == 1  # step 0 waits in the queue; the loop is not training: no further plan yet
        pace.set()  # the loop trains: the planner fills its queue (3) and holds one more ready to hand over
        assert wait_until(lambda: len(pulled) == 4)
        time.sleep(0.1)
        assert len(pulled) == 4
        pace.clear()
        assert [next(stream) for _ in range(4)] == [0, 1, 2, 3]  # drained while not training ...
        assert next(stream) == 4  # ... the planner still delivers: it plans when nothing is left
        assert list(stream) == list(range(5, 12))
        assert stream.completed
    finally:
        stream.close()
        stream.join(10)
