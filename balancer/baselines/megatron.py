"""Megatron's schedulers: Megatron-LM's ``DpBalancedScheduler`` and megatron-core's hybrid
context parallelism (``BalancedCPScheduler``), both reproduced exactly where Megatron
defines them (``tests/fixtures/baselines/megatron_*.json`` hold Megatron's answers)."""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.layout import Layout, Replica, Strategy

from .base import Assignment, BaselinePolicy, _pack_tokens, _split_largest
from .hybrid_cp import balanced_cp_rounds, gpus_needed
from .rules import dp_balanced_groups
from .static import _powers_of_two, _priced

__all__ = ["MegatronDpBalancedPolicy", "MegatronHybridCpPolicy"]


class MegatronDpBalancedPolicy(BaselinePolicy):
    """Megatron-LM ``DpBalancedScheduler``: next-fit in sampler order, a multiple of R groups.

    Groups of the layout capacity (Megatron's ``max_seqlen_per_dp_cp_rank × cp``) are
    filled in the batch's order; trailing sequences then move into one-sequence groups
    until the count is a multiple of ``R``
    (:func:`~balancer.baselines.rules.dp_balanced_groups`); group ``k·R + d`` is
    micro-batch ``k`` of replica ``d``. Like Megatron it refuses
    (:class:`~balancer.baselines.rules.PeerRefusal`) a batch it would have to split the
    first group for, e.g. one that fits a single group. A
    replica with fewer than ``pp`` micro-batches has its fullest split (our pipeline
    rule; Megatron requires enough micro-batches up front).
    """

    name = "megatron_dp_balanced"
    system = "Megatron-LM main `DpBalancedScheduler`"
    fidelity = "exact: every rank's micro-batches (31/31 fixtures) and the same refusals (5/5)"

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        num = len(self.strategy.replicas)
        groups = [np.asarray(g, dtype=np.int64) for g in dp_balanced_groups(lengths, self.capacity, num)]
        per_replica = [groups[d::num] for d in range(num)]
        pps = [rep.layout.pp for rep in self.strategy.replicas]
        return self.strategy, [_split_largest(m, lengths, pp) for m, pp in zip(per_replica, pps)]


class MegatronHybridCpPolicy(BaselinePolicy):
    """megatron-core hybrid (dynamic) context parallelism over the static layout's cp slots.

    The static strategy has ``D`` replicas of ``(tp, C, pp)``; Megatron pools their
    ``D·C`` cp slots ("GPUs" below, each ``tp·pp`` ranks) and schedules every batch with
    :func:`~balancer.baselines.hybrid_cp.balanced_cp_rounds`, with
    ``max_seq_len_per_rank`` = the most tokens per slot that every power-of-two group
    size holds (``min_g capacity(tp, g, pp) / g``). Each group of ``g`` slots becomes a
    replica of layout ``(tp, g, pp)`` (slots taken in order, so a group may span static
    replicas). What a ``StepPlan`` cannot say — one grouping per step — differs:

    * Megatron may regroup the GPUs in every round; here the first round's groups hold
      for the step and a later round's sequences join the least-loaded (``Σ L²/g``)
      group of their size (else the next larger, else the largest) as one more
      micro-batch;
    * Megatron runs a round's sequences on a group as one packed micro-batch with no
      token cap; here they are cut first-fit decreasing at the group layout's token
      capacity when they exceed it (the cost model's memory limit).
    """

    name = "megatron_hybrid_cp"
    system = "megatron-core 0.16.1 `BalancedCPScheduler` (hybrid cp)"
    fidelity = ("schedule exact (36/36, several rounds included); one grouping per step (the first round's), "
                "micro-batches cut at the layout's token capacity")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if len(set(self.strategy.layouts)) != 1:
            raise ValueError("megatron_hybrid_cp starts from a homogeneous static strategy")
        base = self.strategy.layouts[0]
        self.base = base
        self.num_slots = len(self.strategy.replicas) * base.cp
        """Megatron's dp×cp pool: cp slots of ``tp·pp`` ranks each."""
        self._layouts: dict[int, Layout] = {}
        for g in _powers_of_two(self.num_slots):
            lay = Layout(tp=base.tp, cp=g, pp=base.pp)
            if _priced(self.cost_model, lay):
                self._layouts[g] = lay
        per_slot = [self.cost_model.token_capacity(lay) // g for g, lay in self._layouts.items() if g <= base.cp]
        self.max_seq_len_per_rank = max(1, min(per_slot))
        """Megatron's ``max_seqlen_per_dp_cp_rank``, tokens."""
        need = gpus_needed(self.max_length, self.max_seq_len_per_rank)
        if need > self.num_slots or need not in self._layouts:
            raise ValueError(
                f"megatron_hybrid_cp: a {self.max_length}-token sequence needs {need} cp slots of "
                f"{self.max_seq_len_per_rank} tokens, which the {self.num_slots}-slot pool or the cost model "
                f"(layout tp{base.tp}cp{need}) cannot give; lower max_length"
            )

    def _layout(self, g: int) -> Layout:
        return self._layouts[g]

    def _priced_parts(self, slots: tuple[int, ...]) -> list[tuple[int, ...]]:
        """``slots`` as one group, or cut into groups of the largest size the cost model prices."""
        g = len(slots)
        if g in self._layouts:
            return [slots]
        h = max(k for k in self._layouts if k < g)
        return [slots[i : i + h] for i in range(0, g, h)]

    def _replica(self, slots: tuple[int, ...]) -> Replica:
        C, base = self.base.cp, self.base
        ranks = []
        for p in range(base.pp):
            for s in slots:
                static = self.strategy.replicas[s // C]
                ranks.extend(static.rank_at(t, s % C, p) for t in range(base.tp))
        return Replica(self._layout(len(slots)), tuple(ranks))

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        rounds = balanced_cp_rounds(lengths, self.max_seq_len_per_rank, self.num_slots)
        first = rounds[0]
        sizes = [len(g) for g in first.groups]
        work = [float(sum(int(lengths[p]) ** 2 for p in pos)) / len(g) for g, pos in zip(first.groups, first.positions)]
        rounds_of: list[list[np.ndarray]] = [[np.asarray(pos, dtype=np.int64)] for pos in first.positions]
        for rnd in rounds[1:]:
            for grp, pos in zip(rnd.groups, rnd.positions):
                g = len(grp)
                fits = [j for j, sz in enumerate(sizes) if sz == g] or [
                    j for j, sz in enumerate(sizes) if sz == min((s for s in sizes if s > g), default=max(sizes))
                ]
                j = min(fits, key=lambda q: work[q])
                rounds_of[j].append(np.asarray(pos, dtype=np.int64))
                work[j] += float(sum(int(lengths[p]) ** 2 for p in pos)) / sizes[j]
        replicas: list[Replica] = []
        assignment: Assignment = []
        for grp, mbs in zip(first.groups, rounds_of):
            parts = self._priced_parts(grp)
            if len(parts) > 1:  # a group larger than any priced layout: its sequences by LPT on L²
                mbs = self._spread(np.concatenate(mbs), lengths, len(parts), self.cost_model.token_capacity(self._layout(len(parts[0]))))
            for part, part_mbs in zip(parts, mbs if len(parts) > 1 else [mbs]):
                rep = self._replica(part)
                cap = self.cost_model.token_capacity(rep.layout)
                cut: list[np.ndarray] = []
                for m in part_mbs:
                    cut.extend(_pack_tokens(m, lengths, cap, 1) if int(lengths[m].sum()) > cap else [m])
                replicas.append(rep)
                assignment.append(_split_largest(cut, lengths, rep.layout.pp))
        counts: dict[int, int] = {}
        for rep in replicas:
            counts[rep.layout.cp] = counts.get(rep.layout.cp, 0) + 1
        name = "hybridcp:" + "+".join(f"{self._layout(g).name}x{n}" for g, n in sorted(counts.items()))
        return Strategy(name, tuple(replicas)), assignment

    @staticmethod
    def _spread(positions: np.ndarray, lengths: np.ndarray, parts: int, capacity: int) -> list[list[np.ndarray]]:
        """Longest first, each sequence to the part with the least ``Σ L²`` (one micro-batch each)."""
        if lengths[positions].max(initial=0) > capacity:
            raise ValueError(
                f"megatron_hybrid_cp: a {int(lengths[positions].max())}-token sequence needs a cp group the "
                f"cost model cannot price (largest priced holds {capacity} tokens); add larger cp layouts"
            )
        load = np.zeros(parts)
        out: list[list[int]] = [[] for _ in range(parts)]
        for p in positions[np.argsort(-lengths[positions], kind="stable")]:
            j = int(np.argmin(load))
            out[j].append(int(p))
            load[j] += float(lengths[p]) ** 2
        return [[np.asarray(o, dtype=np.int64)] if o else [] for o in out]
