"""WLB-LLM (OSDI 2025): outlier-delay queue and least-workload greedy on αL²+βL."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from packers.types import group_by_bin
from strategies.layout import Strategy

from .base import Assignment, BaselinePolicy, _deal, _least_loaded, _split_largest

__all__ = ["WlbLlmPolicy"]


class WlbLlmPolicy(BaselinePolicy):
    """WLB-LLM (OSDI 2025) workload-aware packing with outlier delay.

    * Workload of a sequence: ``α·L² + β·L`` (default α, β = the layout's a, b).
    * Outlier delay: a sequence longer than a threshold enters that level's FIFO queue
      instead of this step. When a queue holds at least as many sequences as the step has
      micro-batches (``N = R·k``), ``N`` of them (oldest first) join the step, so each
      micro-batch gets one; full rounds are released while the queue allows.
      ``flush=True`` (end of epoch) releases everything, so no sequence is lost.
    * Packing: released outliers, then the rest, each longest-workload first, go to the
      micro-batch with the least workload that still has token room; ``k`` (micro-batches
      per replica) starts at ``max(pp, ⌈tokens / (R·capacity)⌉)`` and grows if something
      does not fit. Micro-batch ``b`` runs on replica ``b mod R``.
    Delayed sequences are trained one or more steps later than sampled: the order of
    samples changes, their multiset per epoch does not.
    """

    name = "wlb_llm"

    def __init__(
        self,
        *args: Any,
        outlier_thresholds: Sequence[int] | None = None,
        alpha: float | None = None,
        beta: float | None = None,
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
        self.outlier_thresholds = levels
        """Level ``q`` holds sequences longer than ``outlier_thresholds[q]`` (and not longer
        than the next threshold), tokens."""
        self._queues: list[list[tuple[int, int, int]]] = [[] for _ in levels]  # (id, length, loss)

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues)

    def state_dict(self) -> dict[str, Any]:
        """The outlier queues (sample id, tokens, loss tokens), oldest first."""
        return {"version": 1, "queues": [[list(x) for x in q] for q in self._queues]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        queues = state.get("queues", [])
        if int(state.get("version", 0)) != 1 or len(queues) != len(self._queues):
            raise ValueError(
                f"cannot resume wlb_llm: state has {len(queues)} queue levels (version {state.get('version')}), "
                f"this policy has {len(self._queues)}; use the same outlier_thresholds"
            )
        self._queues = [[(int(i), int(s), int(lo)) for i, s, lo in q] for q in queues]

    def _num_replicas(self) -> int:
        return len(self.strategy.replicas)

    def _admit(
        self, lengths: np.ndarray, ids: np.ndarray, loss: np.ndarray, flush: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        level = np.searchsorted(np.array(self.outlier_thresholds), lengths, side="left") - 1
        regular = level < 0
        for p in np.flatnonzero(~regular):
            self._queues[int(level[p])].append((int(ids[p]), int(lengths[p]), int(loss[p])))
        pp = self.strategy.layouts[0].pp
        k0 = max(pp, -(-int(lengths[regular].sum()) // (self._num_replicas() * self.capacity)))
        rounds = self._num_replicas() * k0
        released: list[tuple[int, int, int]] = []
        for q in reversed(range(len(self._queues))):
            queue = self._queues[q]
            take = len(queue) if flush else (len(queue) // rounds) * rounds
            released.extend(queue[:take])
            del queue[:take]
        rel = np.array(released, dtype=np.int64).reshape(-1, 3)
        return (
            np.concatenate([rel[:, 1], lengths[regular]]),
            np.concatenate([rel[:, 0], ids[regular]]),
            np.concatenate([rel[:, 2], loss[regular]]),
        )

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
