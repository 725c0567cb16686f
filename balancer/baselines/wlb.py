"""WLB-LLM (OSDI 2025): outlier-delay queue and least-workload greedy on αL²+βL."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from packers.types import group_by_bin
from strategies.layout import Strategy

from .base import Assignment, BaselinePolicy, _deal, _least_loaded, _split_largest

__all__ = ["WlbLlmPolicy"]


class WlbLlmPolicy(BaselinePolicy):
    """WLB-LLM (OSDI 2025, arXiv 2503.17924): outlier delay on a fixed token budget.

    * Workload of a sequence: ``α·L² + β·L`` (default α, β = the layout's a, b).
    * Outlier delay: a sequence longer than an outlier threshold (default one level at
      ``max_length / 2``) enters that level's FIFO queue instead of training now. A level
      releases (oldest first) its full rounds of ``N = R·k`` sequences, so each of the
      step's ``k`` micro-batches per replica gets one. A full round that would not fit
      the budget (hundreds of micro-batches) is cut to what fits half of it, released
      once the level holds that much; and any outlier that has waited ``max_delay`` steps
      (default 8) goes too. The cut and the bound are ours: the paper's queue waits for a
      full round, which at that scale is several budgets of tokens in one step.
    * Fixed global batch: sequences that are not outliers go to a FIFO backlog, and a
      step trains the released outliers, then backlog sequences in order while they fit
      the budget ``tokens_per_step`` (default: the incoming batch's tokens); if that
      leaves the step under half the budget, waiting outliers top it up. A step so
      trains at most the budget and, but for an epoch's end, at least half of it.
      ``flush=True`` (end of epoch) trains everything held.
    * Packing: outliers, then the rest, heaviest workload first, go to the micro-batch
      with the least workload that still has token room; ``k`` starts at
      ``max(pp, ⌈tokens / (R·capacity)⌉)`` and grows if something does not fit.
      Micro-batch ``b`` runs on replica ``b mod R``.

    Delayed sequences train later than sampled: the order of samples changes, their
    multiset per epoch does not. The queues and the backlog are the policy's state.
    """

    name = "wlb_llm"
    system = "WLB-LLM, OSDI 2025 (arXiv 2503.17924)"
    fidelity = "from the paper (no public code); the fixed token budget and the max_delay bound are ours"

    def __init__(
        self,
        *args: Any,
        outlier_thresholds: Sequence[int] | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        max_delay: int = 8,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        if len(set(self.strategy.layouts)) != 1:
            raise ValueError("wlb_llm runs on a homogeneous strategy (one layout for every replica)")
        cost = self.cost_model.cost(self.strategy.layouts[0])
        self.alpha = cost.a if alpha is None else float(alpha)
        self.beta = cost.b if beta is None else float(beta)
        levels = (self.max_length // 2,) if outlier_thresholds is None else tuple(int(t) for t in outlier_thresholds)
        if any(t < 1 for t in levels) or list(levels) != sorted(set(levels)):
            raise ValueError(f"outlier_thresholds={levels} must be increasing positive token counts")
        if int(max_delay) < 1:
            raise ValueError(f"max_delay={max_delay} must be >= 1 step")
        self.outlier_thresholds = levels
        """Level ``q`` holds sequences longer than ``outlier_thresholds[q]`` (and not longer
        than the next threshold), tokens."""
        self.max_delay = int(max_delay)
        """Steps an outlier may wait before it is released without a full round."""
        self._queues: list[list[tuple[int, int, int, int]]] = [[] for _ in levels]  # (id, length, loss, since)
        self._backlog: list[tuple[int, int, int]] = []  # (id, length, loss), oldest first
        self._calls = 0

    def held(self) -> np.ndarray:
        ids = [x[0] for q in self._queues for x in q] + [x[0] for x in self._backlog]
        return np.array(ids, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        """Outlier queues (id, tokens, loss tokens, step queued), backlog, step counter."""
        return {
            "version": 2,
            "queues": [[list(x) for x in q] for q in self._queues],
            "backlog": [list(x) for x in self._backlog],
            "calls": self._calls,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        queues = state.get("queues", [])
        if int(state.get("version", 0)) != 2 or len(queues) != len(self._queues):
            raise ValueError(
                f"cannot resume wlb_llm: state has {len(queues)} queue levels (version {state.get('version')}), "
                f"this policy has {len(self._queues)} (version 2); use the same outlier_thresholds"
            )
        self._queues = [[(int(i), int(s), int(lo), int(t)) for i, s, lo, t in q] for q in queues]
        self._backlog = [(int(i), int(s), int(lo)) for i, s, lo in state.get("backlog", [])]
        self._calls = int(state.get("calls", 0))

    def _num_replicas(self) -> int:
        return len(self.strategy.replicas)

    def _admit(
        self, lengths: np.ndarray, ids: np.ndarray, loss: np.ndarray, flush: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        now = self._calls
        self._calls += 1
        budget = int(self.tokens_per_step) if self.tokens_per_step is not None else int(lengths.sum())
        level = np.searchsorted(np.array(self.outlier_thresholds), lengths, side="left") - 1
        for p in range(lengths.size):
            item = (int(ids[p]), int(lengths[p]), int(loss[p]))
            if level[p] >= 0:
                self._queues[int(level[p])].append((*item, now))
            else:
                self._backlog.append(item)
        chosen: list[tuple[int, int, int]] = []
        if flush:
            for q in reversed(self._queues):
                chosen.extend(x[:3] for x in q)
                q.clear()
            chosen.extend(self._backlog)
            self._backlog.clear()
        else:
            pp = self.strategy.layouts[0].pp
            rounds = self._num_replicas() * max(pp, -(-budget // (self._num_replicas() * self.capacity)))
            total = 0
            for q in reversed(self._queues):  # longest level first
                due = sum(1 for x in q if now - x[3] >= self.max_delay)
                take = max(self._round(q, rounds, budget), due)
                total = self._take(q, take, budget, total, chosen)
            total = self._take(self._backlog, len(self._backlog), budget, total, chosen)
            for q in reversed(self._queues):  # top up a step that would train under half its budget
                if total * 2 < budget:
                    total = self._take(q, len(q), budget, total, chosen)
            if not chosen:  # a budget below every held sequence: train the oldest one
                source = next((q for q in reversed(self._queues) if q), self._backlog)
                if source:
                    self._take(source, 1, None, 0, chosen)
        arr = np.array(chosen, dtype=np.int64).reshape(-1, 3)
        return arr[:, 1].copy(), arr[:, 0].copy(), arr[:, 2].copy()

    @staticmethod
    def _round(queue: list[Any], rounds: int, budget: int) -> int:
        """Outliers a level releases now: its full rounds of ``rounds`` (one per micro-batch)
        when they fit the budget; else, once the level holds more than half the budget in
        tokens, the oldest that fit in half of it (the largest round a fixed batch allows)."""
        full = (len(queue) // rounds) * rounds
        tokens = np.cumsum([x[1] for x in queue]) if queue else np.zeros(0, dtype=np.int64)
        if full and tokens[full - 1] <= budget:
            return full
        if tokens.size and 2 * int(tokens[-1]) > budget:
            return int(np.searchsorted(tokens, budget // 2, side="right"))
        return 0

    @staticmethod
    def _take(queue: list[Any], count: int, budget: int | None, total: int, out: list[tuple[int, int, int]]) -> int:
        """Move up to ``count`` items from the head of ``queue`` to ``out`` while they fit ``budget``."""
        n = 0
        while n < min(count, len(queue)) and (budget is None or total + queue[n][1] <= budget):
            out.append(tuple(queue[n][:3]))
            total += queue[n][1]
            n += 1
        del queue[:n]
        return total

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        num = self._num_replicas()
        pp = self.strategy.layouts[0].pp
        s = lengths.astype(np.float64)
        work = self.alpha * s * s + self.beta * s
        order = np.argsort(-work, kind="stable")  # outliers are the heaviest, so they go first
        k = max(pp, -(-int(lengths.sum()) // (num * self.capacity)))
        while True:
            bin_of = _least_loaded(order, work, lengths, num * k, self.capacity)
            if bin_of.min() >= 0:
                break
            k += 1
        bins = group_by_bin(bin_of, num * k)
        per_replica = _deal(bins, num)
        return self.strategy, [_split_largest(mbs, lengths, pp) for mbs in per_replica]
