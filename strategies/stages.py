"""Pipeline stages without torch: the 1F1B schedule as data, and its exact replay.

Shared by the runtime (:mod:`strategies.runtime.pipeline` runs the schedule), the
benchmarks and the tests, which replay it on given per-stage times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "P2P",
    "Compute",
    "Exchange",
    "one_f_one_b",
    "simulate_1f1b",
]


# -- the schedule ---------------------------------------------------------------------------------
FORWARD, BACKWARD = "forward", "backward"
SEND, RECV = "send", "recv"
ACT, GRAD = "act", "grad"


@dataclass(frozen=True, slots=True)
class Compute:
    """Run the forward or the backward of micro-batch ``micro_batch`` on this stage."""

    kind: str
    micro_batch: int


@dataclass(frozen=True, slots=True)
class P2P:
    """Send or receive the activation (to/from the next/previous stage) or its gradient."""

    direction: str
    """``send`` or ``recv``."""
    what: str
    """``act`` (forward, to the next stage) or ``grad`` (backward, to the previous stage)."""
    micro_batch: int

    @property
    def peer_offset(self) -> int:
        """+1: the next stage, −1: the previous one."""
        return 1 if (self.what == ACT) == (self.direction == SEND) else -1


@dataclass(frozen=True, slots=True)
class Exchange:
    """Point-to-point ops posted together and waited on together."""

    ops: tuple[P2P, ...]


def one_f_one_b(pp: int, pp_rank: int, num_micro_batches: int) -> list[Compute | Exchange]:
    """Stage ``pp_rank``'s op list of a non-interleaved 1F1B step over ``num_micro_batches``."""
    if not 0 <= pp_rank < pp:
        raise ValueError(f"one_f_one_b: pp_rank={pp_rank} outside 0..{pp - 1}")
    first, last, v = pp_rank == 0, pp_rank == pp - 1, num_micro_batches
    ops: list[Compute | Exchange] = []

    def recv_act(k: int) -> list[P2P]:
        return [] if first else [P2P(RECV, ACT, k)]

    def send_act(k: int) -> list[P2P]:
        return [] if last else [P2P(SEND, ACT, k)]

    def recv_grad(k: int) -> list[P2P]:
        return [] if last else [P2P(RECV, GRAD, k)]

    def send_grad(k: int) -> list[P2P]:
        return [] if first else [P2P(SEND, GRAD, k)]

    def exchange(*parts: list[P2P]) -> None:
        together = tuple(op for part in parts for op in part)
        if together:
            ops.append(Exchange(together))

    warmup = min(pp - pp_rank - 1, v)
    for k in range(warmup):  # fill: forwards only
        exchange(recv_act(k))
        ops.append(Compute(FORWARD, k))
        exchange(send_act(k))
    steady = v - warmup
    if steady:
        exchange(recv_act(warmup))
    for i in range(steady):  # one forward, one backward
        f = warmup + i
        ops.append(Compute(FORWARD, f))
        exchange(send_act(f), recv_grad(i))
        ops.append(Compute(BACKWARD, i))
        exchange(send_grad(i), recv_act(f + 1) if i + 1 < steady else [])
    for k in range(steady, v):  # drain: backwards only
        exchange(recv_grad(k))
        ops.append(Compute(BACKWARD, k))
        exchange(send_grad(k))
    return ops


# -- the exact schedule, replayed -----------------------------------------------------------------
def simulate_1f1b(forward: np.ndarray | list[list[float]], backward: np.ndarray | list[list[float]]) -> float:
    """Makespan (seconds) of the runtime's 1F1B op lists when stage ``p`` spends
    ``forward[p][k]`` and ``backward[p][k]`` on micro-batch ``k`` and point-to-point transfers
    are free but rendezvous (an exchange completes when both sides have posted it)."""
    pp, v = len(forward), len(forward[0])
    progs = [one_f_one_b(pp, p, v) for p in range(pp)]
    pos, clock = [0] * pp, [0.0] * pp
    pending: list[dict[P2P, float] | None] = [None] * pp  # open exchange: op → time it can complete
    posted = [0.0] * pp
    while any(pos[p] < len(progs[p]) for p in range(pp)):
        moved = False
        for p in range(pp):
            while pos[p] < len(progs[p]) and isinstance(progs[p][pos[p]], Compute):
                op = progs[p][pos[p]]
                clock[p] += float((forward if op.kind == FORWARD else backward)[p][op.micro_batch])
                pos[p] += 1
                moved = True
            if pos[p] < len(progs[p]) and pending[p] is None:
                pending[p] = {o: -1.0 for o in progs[p][pos[p]].ops}
                posted[p] = clock[p]
                moved = True
        for p in range(pp):
            for o, t in (pending[p] or {}).items():
                q = p + o.peer_offset
                match = P2P(RECV if o.direction == SEND else SEND, o.what, o.micro_batch)
                if t < 0 and pending[q] is not None and match in pending[q]:
                    pending[p][o] = pending[q][match] = max(posted[p], posted[q])
                    moved = True
        for p in range(pp):
            if pending[p] is not None and all(t >= 0 for t in pending[p].values()):
                clock[p] = max([posted[p], *pending[p].values()])
                pending[p] = None
                pos[p] += 1
                moved = True
        if not moved:
            raise RuntimeError("simulate_1f1b: the schedule is stuck (a bug in one_f_one_b)")
    return max(clock)
