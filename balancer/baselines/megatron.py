"""Megatron-LM's schedulers: data-parallel balanced next-fit and hybrid context parallelism."""

from __future__ import annotations

from typing import Any

import numpy as np

from packers.binpack import next_fit
from strategies.layout import Layout, Replica, Strategy

from .base import (
    Assignment,
    BaselinePolicy,
    _deal,
    _least_loaded,
    _pack_tokens,
    _split_largest,
)
from .packing import MultipackPolicy
from .static import _powers_of_two, _priced

__all__ = ["MegatronDpBalancedPolicy", "MegatronHybridCpPolicy"]


class MegatronDpBalancedPolicy(MultipackPolicy):
    """Megatron-Core ``dp_balanced`` packing: next-fit in sampler order, equal bins per rank.

    Sequences are packed in their given order, a new bin opening whenever the next one
    does not fit (bins sized as for ``multipack``). The bin count is then raised to a
    multiple of ``R`` (splitting the fullest bins; empty micro-batches if nothing can be
    split) so every data-parallel rank runs the same number of micro-batches; bin ``b``
    goes to replica ``b mod R``.
    """

    name = "megatron_dp_balanced"
    packer = staticmethod(next_fit)

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        bins = self._bins(lengths)
        num = len(self.strategy.replicas)
        bins = _split_largest(bins, lengths, -(-len(bins) // num) * num)
        return self.strategy, self._finish(_deal(bins, num), lengths)

class MegatronHybridCpPolicy(BaselinePolicy):
    """Megatron-Core hybrid (dynamic) context parallelism on the static layout's cp groups.

    The static strategy has ``D`` replicas of ``(tp, C, pp)``; its ``D·C`` cp slots form
    one pool. Each sequence gets the smallest power-of-two cp degree ``k <= C`` whose
    layout ``(tp, k, pp)`` holds it (Megatron's ``gpus_needed``). Per step the pool is cut
    into groups: every cp degree in use gets one group, further groups go to the degree
    with the most cost-model rank-seconds per slot while slots remain (and while it has
    more sequences than groups); groups are laid out largest
    first, so each stays inside one static replica. Inside a degree, sequences go
    longest first to the group with the least ``Σ L²/k`` (Megatron's workload estimate),
    then are packed first-fit-decreasing by tokens into micro-batches. Each group is a
    replica of layout ``(tp, k, pp)`` in this step's strategy.
    """

    name = "megatron_hybrid_cp"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if len(set(self.strategy.layouts)) != 1:
            raise ValueError("megatron_hybrid_cp starts from a homogeneous static strategy")
        base = self.strategy.layouts[0]
        self.base = base
        degrees = [k for k in _powers_of_two(base.cp) if base.cp % k == 0]
        self.degrees: list[int] = []
        self.capacities: list[int] = []
        for k in degrees:
            lay = Layout(tp=base.tp, cp=k, pp=base.pp)
            if _priced(self.cost_model, lay):
                self.degrees.append(k)
                self.capacities.append(self.cost_model.token_capacity(lay))
        # max_length <= capacity of the static layout (checked by the base class)

    def _degree_of(self, lengths: np.ndarray) -> np.ndarray:
        """Index into ``self.degrees`` of the smallest cp degree whose capacity holds each sequence."""
        caps = np.array(self.capacities)
        fits = lengths[:, None] <= caps[None, :]
        return np.argmax(fits, axis=1)

    def _allocate(self, work: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Groups per cp degree: one per degree in use, then by work per slot while slots remain."""
        slots = len(self.strategy.replicas) * self.base.cp
        used = [d for d in range(len(self.degrees)) if counts[d] > 0]
        # Too many degrees for the pool (only with one static replica): run the lightest
        # degrees on the next larger degree in use.
        while sum(self.degrees[d] for d in used) > slots:
            d = used.pop(0)
            nxt = used[0]
            work[nxt] += work[d]
            counts[nxt] += counts[d]
            work[d] = 0
            counts[d] = 0
        groups = np.zeros(len(self.degrees), dtype=np.int64)
        for d in used:
            groups[d] = 1
        free = slots - sum(self.degrees[d] for d in used)
        while free > 0:
            open_ = [d for d in used if self.degrees[d] <= free and groups[d] < counts[d]]
            if not open_:
                break
            d = max(open_, key=lambda q: (work[q] / (groups[q] * self.degrees[q]), -self.degrees[q]))
            groups[d] += 1
            free -= self.degrees[d]
        return groups

    def _assign(self, lengths: np.ndarray, rng: np.random.Generator) -> tuple[Strategy, Assignment]:
        deg_idx = self._degree_of(lengths)
        sq = lengths.astype(np.float64) ** 2
        base, C = self.base, self.base.cp
        # rank-seconds per degree from the cost model, to size the groups
        work = np.zeros(len(self.degrees))
        for d, k in enumerate(self.degrees):
            members = lengths[deg_idx == d]
            if members.size:
                lay = Layout(tp=base.tp, cp=k, pp=base.pp)
                work[d] = k * float(self.cost_model.seconds(members, lay).sum())
        counts = np.bincount(deg_idx, minlength=len(self.degrees)).astype(np.int64)
        groups = self._allocate(work, counts)
        # sequences of a degree merged upward (single static replica) follow their new degree
        for d in range(len(self.degrees)):
            if counts[d] == 0 and np.any(deg_idx == d):
                deg_idx[deg_idx == d] = next(q for q in range(d + 1, len(self.degrees)) if groups[q] > 0)
        # lay out groups largest first over the slot pool: slot g -> static replica g // C
        replicas: list[Replica] = []
        group_degree: list[int] = []
        slot = 0
        for d in sorted(range(len(self.degrees)), key=lambda q: -self.degrees[q]):
            k = self.degrees[d]
            for _ in range(int(groups[d])):
                static = self.strategy.replicas[slot // C]
                c0 = slot % C
                ranks = [static.rank_at(t, c, p) for p in range(base.pp) for c in range(c0, c0 + k) for t in range(base.tp)]
                replicas.append(Replica(Layout(tp=base.tp, cp=k, pp=base.pp), tuple(ranks)))
                group_degree.append(d)
                slot += k
        k = self.degrees[0]
        while slot < len(self.strategy.replicas) * C:  # leftover slots idle, in the smallest groups
            static = self.strategy.replicas[slot // C]
            c0 = slot % C
            ranks = [static.rank_at(t, c, p) for p in range(base.pp) for c in range(c0, c0 + k) for t in range(base.tp)]
            replicas.append(Replica(Layout(tp=base.tp, cp=k, pp=base.pp), tuple(ranks)))
            group_degree.append(-1)
            slot += k
        assignment: Assignment = [[] for _ in replicas]
        for d in range(len(self.degrees)):
            members = np.flatnonzero(deg_idx == d)
            if members.size == 0:
                continue
            slots_of = [g for g, gd in enumerate(group_degree) if gd == d]
            k = self.degrees[d]
            order = members[np.argsort(-sq[members], kind="stable")]
            local = _least_loaded(
                np.arange(order.size, dtype=np.int64), sq[order] / k, lengths[order], len(slots_of), np.iinfo(np.int64).max
            )
            for g_local, g in enumerate(slots_of):
                pos = np.sort(order[local == g_local])
                assignment[g] = _pack_tokens(pos, lengths, self.capacities[d], base.pp)
        name = "hybridcp:" + "+".join(
            f"{Layout(tp=base.tp, cp=self.degrees[d], pp=base.pp).name}x{int(groups[d])}"
            for d in range(len(self.degrees)) if groups[d]
        )
        return Strategy(name, tuple(replicas)), assignment
