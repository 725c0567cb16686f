"""Bounded look-ahead in the map-style sampler: regroup each window of ``k`` global batches.

With ``BalancerConfig(lookahead_steps=k)`` (``k ≥ 2``) the sampler's global batches are
grouped into windows aligned to the epoch — window ``w`` holds steps
``[w·k, min((w+1)·k, steps in the epoch))`` — and each window is regrouped by
:class:`balancer.lookahead.WindowPlanner` before its steps are planned. What changes and
what does not:

* the *order* of sequences within the window (a sequence trains at most ``k − 1`` steps
  earlier or later than sampled);
* not the multiset of an epoch (every sequence exactly once), the number of steps, the
  token budget per step (every regrouped step within ``(1 ± ε)·tokens_per_step``; with
  ``sequences_per_step`` every step keeps its count), nor anything across epochs.

Every rank regroups the same windows identically (the regrouping depends only on the
sampled batches, the candidates, the cost model and the configured rank speeds), so
nothing is exchanged and ``plan_sync`` works as without look-ahead.

State. The regrouping of the window that holds the resume point is part of the
sampler's state: ``{"version", "steps", "epoch", "start", "end", "queue"}`` — ``queue``
the sequence ids of steps ``start..end−1`` (the rest of that window, as regrouped). A
resumed run trains exactly that queue, even if the candidates or cost model changed in
between (a recomputed regrouping could differ), then regroups the next windows as usual.
The queue is validated against the sampled window: ids of that window only, each once,
one list per remaining step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from balancer.lookahead import WindowPlanner

from .planning import PlanBatch
from .state import state_int

__all__ = ["LookaheadWindows", "lookahead_steps"]

_STATE_VERSION = 1
_CACHED_WINDOWS = 8
"""Regrouped windows kept for :meth:`LookaheadWindows.state_at` (older ones are recomputed)."""

StepArrays = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(ids, lengths, loss_tokens)`` of one step's sequences (int64 each)."""


def lookahead_steps(balancer: Any) -> int:
    """``balancer.config.lookahead_steps`` when look-ahead is on (``≥ 2``), else 0."""
    k = int(getattr(getattr(balancer, "config", None), "lookahead_steps", 0) or 0)
    return k if k >= 2 else 0


@dataclass(frozen=True)
class _Window:
    first: int
    """Step in the epoch of ``steps[0]`` (the window's start, or a resume point inside it)."""
    end: int
    """One past the window's last step in the epoch."""
    steps: tuple[StepArrays, ...]


class LookaheadWindows:
    """Regroups a sampler's windows (module docstring).

    ``sampled(epoch, t)`` gives the sampled step ``t`` of ``epoch`` as :data:`StepArrays`;
    ``num_steps(epoch)`` the steps of an epoch; ``tokens_per_step`` the token budget
    (``None``: fixed sequence counts).
    """

    def __init__(
        self,
        balancer: Any,
        *,
        sampled: Callable[[int, int], StepArrays],
        num_steps: Callable[[int], int],
        tokens_per_step: int | None,
    ) -> None:
        self.k = lookahead_steps(balancer)
        if not self.k:
            raise ValueError("LookaheadWindows needs a balancer with config.lookahead_steps >= 2")
        self.planner = WindowPlanner.from_balancer(balancer)
        self.tokens_per_step = tokens_per_step
        self._sampled = sampled
        self._num_steps = num_steps
        self._lock = threading.Lock()
        self._windows: OrderedDict[tuple[int, int], _Window] = OrderedDict()
        self._loaded: dict[tuple[int, int], _Window] = {}
        """Windows resumed from a state's queue: they win over a recomputation."""
        self.regroupings: list[tuple[int, int, str, float]] = []
        """``(epoch, window start, proposal, estimated gain)`` of the windows computed so far (last 64)."""

    # -- windows ------------------------------------------------------------------------------
    def bounds(self, epoch: int, t: int) -> tuple[int, int]:
        """``(start, end)`` steps in the epoch of the window holding step ``t``."""
        start = (t // self.k) * self.k
        return start, min(start + self.k, self._num_steps(epoch))

    def _compute(self, epoch: int, start: int, end: int) -> _Window:
        parts = [self._sampled(epoch, t) for t in range(start, end)]
        ids = np.concatenate([p[0] for p in parts])
        lengths = np.concatenate([p[1] for p in parts])
        loss = np.concatenate([p[2] for p in parts])
        step_of = np.repeat(np.arange(end - start), [p[0].size for p in parts])
        plan = self.planner.plan(lengths, step_of, tokens_per_step=self.tokens_per_step, num_steps=end - start)
        self.regroupings.append((epoch, start, plan.proposal, plan.gain))
        del self.regroupings[:-64]
        steps = tuple((ids[pos], lengths[pos], loss[pos]) for pos in plan.steps())
        return _Window(first=start, end=end, steps=steps)

    def window(self, epoch: int, t: int) -> _Window:
        """The regrouped window holding step ``t`` (a resumed queue if one covers ``t``)."""
        start, end = self.bounds(epoch, t)
        key = (epoch, start)
        with self._lock:
            loaded = self._loaded.get(key)
            if loaded is not None and loaded.first <= t:
                return loaded
            got = self._windows.get(key)
            if got is None:
                got = self._windows[key] = self._compute(epoch, start, end)
                while len(self._windows) > _CACHED_WINDOWS:
                    self._windows.popitem(last=False)
            return got

    def batches(self, epoch: int, start: int, global_step: int) -> Iterator[PlanBatch]:
        """Regrouped :class:`PlanBatch` es of ``epoch`` from step ``start`` on."""
        with self._lock:  # restarting before a resumed queue's start (set_epoch) drops the queue
            for key in [key for key, w in self._loaded.items() if key[0] == epoch and w.first > start]:
                del self._loaded[key]
        n = self._num_steps(epoch)
        for t in range(start, n):
            win = self.window(epoch, t)
            ids, lengths, loss = win.steps[t - win.first]
            yield PlanBatch(step=global_step + t - start, lengths=lengths, ids=ids, loss_tokens=loss, meta=(epoch, t))

    # -- state ----------------------------------------------------------------------------------
    def state_at(self, epoch: int, t: int) -> dict[str, Any]:
        """The queue that resumes at step ``t`` of ``epoch``: the rest of its window."""
        state: dict[str, Any] = {"version": _STATE_VERSION, "steps": self.k, "epoch": int(epoch), "start": int(t), "end": int(t)}
        start, end = self.bounds(epoch, t)
        if t == start or t >= end:
            state["queue"] = []
            return state
        win = self.window(epoch, t)
        state["end"] = int(win.end)
        state["queue"] = [win.steps[u - win.first][0].tolist() for u in range(t, win.end)]
        return state

    def check_state(self, state: Mapping[str, Any] | None, epoch: int, t: int) -> _Window | None:
        """Validate a saved queue for resuming at step ``t`` of ``epoch``; the window to resume
        with (``None``: at a window boundary, nothing queued). Raises ``ValueError`` naming
        the field and the fix."""
        start, end = self.bounds(epoch, t)
        mid = start < t < end
        as_sampled = _Window(first=t, end=end, steps=tuple(self._sampled(epoch, u) for u in range(t, end))) if mid else None
        if state is None:
            # Saved without look-ahead: the window's first steps trained as sampled, so the rest
            # of it must too (regrouping it now would lose or repeat sequences).
            return as_sampled
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"cannot resume look-ahead state version {state.get('version')!r} (expected {_STATE_VERSION})")
        missing = {"steps", "epoch", "start", "end", "queue"} - set(state)
        if missing:
            raise ValueError(f"cannot resume: look-ahead state lacks {sorted(missing)}")
        saved_k, saved_epoch, saved_start, saved_end = (
            state_int(state, key, "look-ahead") for key in ("steps", "epoch", "start", "end")
        )
        queue = state["queue"]
        if not isinstance(queue, list):
            raise ValueError(f"cannot resume: look-ahead queue must be a list of id lists, got {type(queue).__name__}")
        if (saved_epoch, saved_start) != (epoch, t):
            raise ValueError(
                f"cannot resume: the look-ahead queue was saved at epoch {state['epoch']} step {state['start']}, "
                f"the sampler resumes at epoch {epoch} step {t}; save both in one state_dict"
            )
        if saved_k != self.k and queue:
            raise ValueError(
                f"cannot resume: the run was saved inside a window of lookahead_steps={state['steps']}; build the "
                f"balancer with BalancerConfig(lookahead_steps={state['steps']}) (this one has {self.k}), or resume "
                "from a state saved at a window boundary"
            )
        if not queue:
            if mid and saved_k == self.k:
                raise ValueError(
                    f"cannot resume: step {t} of epoch {epoch} is inside a look-ahead window ({start}..{end - 1}) "
                    "but the state's queue is empty"
                )
            # At a boundary of the saved run's windows: every window before ``t`` was complete,
            # so the rest of this one has trained nothing yet and runs as sampled.
            return as_sampled
        if saved_end != end or len(queue) != end - t:
            raise ValueError(
                f"cannot resume: the look-ahead queue holds {len(queue)} steps ending at step {state['end']}, but the "
                f"window of step {t} runs to step {end} ({end - t} steps); the epoch's batches changed"
            )
        parts = [self._sampled(epoch, u) for u in range(start, end)]
        ids = np.concatenate([p[0] for p in parts])
        lengths = np.concatenate([p[1] for p in parts])
        loss = np.concatenate([p[2] for p in parts])
        where = {int(i): j for j, i in enumerate(ids.tolist())}
        seen: set[int] = set()
        steps = []
        for u, step_ids in enumerate(queue):
            if not isinstance(step_ids, list) or not step_ids:
                raise ValueError(f"cannot resume: look-ahead queue step {t + u} must be a non-empty list of sequence ids")
            pos = []
            for pid in step_ids:
                if isinstance(pid, (bool, np.bool_)) or not isinstance(pid, (int, np.integer)):
                    raise ValueError(f"cannot resume: look-ahead queue step {t + u} holds {pid!r}; sequence ids are integers")
                j = where.get(int(pid))
                if j is None:
                    raise ValueError(
                        f"cannot resume: look-ahead queue step {t + u} names sequence {pid}, which is not in the sampled "
                        f"window {start}..{end - 1} of epoch {epoch}; the dataset, seed or batching changed"
                    )
                if j in seen:
                    raise ValueError(f"cannot resume: look-ahead queue names sequence {pid} twice")
                seen.add(j)
                pos.append(j)
            p = np.asarray(pos, dtype=np.int64)
            steps.append((ids[p], lengths[p], loss[p]))
        return _Window(first=t, end=end, steps=tuple(steps))

    def load(self, epoch: int, t: int, window: _Window | None) -> None:
        """Resume with a window from :meth:`check_state` (drops earlier resumed queues)."""
        with self._lock:
            self._loaded.clear()
            self._windows.clear()  # the pieces may have been rebuilt (another max_length)
            if window is not None:
                self._loaded[(epoch, self.bounds(epoch, t)[0])] = window
