"""Pipeline stages without torch: the stage split, the 1F1B schedule as data, its exact replay.

Shared by the runtime (:mod:`strategies.runtime.pipeline` splits its model with
:func:`split_stages` and runs :func:`one_f_one_b`), the benchmarks and the tests.

**Stage split** (:func:`split_stages`). ``num_layers`` transformer blocks are cut into
``pp`` contiguous stages of at least one block each. The first stage also runs the token
embedding and the last the final norm, the LM head and the loss; their costs, in units of
one block, are ``first_extra`` and ``last_extra``. Stage ``p`` then costs
``blocks_p + extra_p`` and the split minimises the slowest stage — what bounds a
pipeline's throughput, and what the planner prices as "one stage" (it assumes ``pp``
equal stages). Blocks are alike, so only the stage sizes matter; among the splits with
the smallest maximum the one chosen also has the smallest second-largest stage, and so on
(the sorted stage costs are lexicographically smallest), and of those the one with the
most blocks up front. With no extras that is the count split: sizes differ by at most
one, the larger first.

**Stage costs** (:func:`lm_head_blocks`): forward FLOPs per token on one rank of a
``tp`` group (the backward is about twice the forward for both, so the ratio holds for
forward + backward). A block — attention projections, causal attention, SwiGLU MLP —
with hidden ``h``, key/value width ``k = num_kv_heads·h/num_heads``, MLP width ``f``, at
sequence length ``s`` (:data:`REPRESENTATIVE_SEQ_LEN`):

    block(s) = [ 2·h·(2h + 2k)  +  2·3·h·f  +  2·h·s ] / tp
               (wq, wo, wk, wv)  (gate, up, down)  (QKᵀ and A·V, causal: s/2 keys on average)

and the LM head with the loss over a vocabulary of ``V``, split by vocabulary rows over the
tp ranks like the blocks (:mod:`strategies.runtime.model`; the busiest rank holds
``⌈V/tp⌉`` rows):

    head = (2·h + LOSS_FLOPS_PER_LOGIT) · ⌈V/tp⌉

so ``last_extra = head / block(s)`` — the same at every ``tp`` that divides ``V``; the
embedding is a lookup (``first_extra = 0``).
Under context parallelism both are divided by ``cp`` and the ratio is unchanged. The
norms and the element-wise work are left out (a few FLOPs per ``h``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = [
    "P2P",
    "REPRESENTATIVE_SEQ_LEN",
    "Compute",
    "Exchange",
    "block_flops_per_token",
    "check_pipeline_degree",
    "lm_head_blocks",
    "one_f_one_b",
    "simulate_1f1b",
    "split_stages",
    "stage_costs",
    "stage_imbalance",
]

REPRESENTATIVE_SEQ_LEN = 2048
"""Sequence length (tokens) at which a block's attention term is priced for the split. A
constant, so every rank derives the same split from the model's shape alone."""
LOSS_FLOPS_PER_LOGIT = 5
"""Cross-entropy per logit: the max, the subtraction, the exponential, the sum, the pick."""


# -- the stage split ------------------------------------------------------------------------------
def check_pipeline_degree(num_layers: int, pp: int) -> None:
    """``ValueError`` unless ``1 <= pp <= num_layers`` (every stage needs a block)."""
    if isinstance(pp, bool) or not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pipeline degree pp={pp!r} must be a positive integer")
    if pp > num_layers:
        raise ValueError(
            f"pipeline degree pp={pp} exceeds num_layers={num_layers}: every stage needs at least one "
            f"transformer block; drop layouts with pp > {num_layers} from the candidates (CandidateConfig.max_pp)"
        )


def split_stages(num_layers: int, pp: int, *, first_extra: float = 0.0, last_extra: float = 0.0) -> list[range]:
    """Blocks of each of ``pp`` stages: contiguous, at least one each, the slowest stage as
    fast as it can be (module docstring). ``first_extra``/``last_extra``: the first/last
    stage's work besides its blocks, in blocks (≥ 0)."""
    check_pipeline_degree(num_layers, pp)
    for name, x in (("first_extra", first_extra), ("last_extra", last_extra)):
        if not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0):
            raise ValueError(f"split_stages: {name}={x!r} must be a finite cost >= 0 (in blocks)")
    # exact arithmetic (a float is a fraction): no rounding decides a tie
    extra = [Fraction(0)] * pp
    extra[0] += Fraction(first_extra)
    extra[-1] += Fraction(last_extra)
    # Water-filling: every stage starts with one block, and each further block goes to the
    # cheapest stage (the first of equals). With identical blocks this reaches the
    # lexicographically smallest sorted costs (and so the smallest maximum), front-loaded on ties.
    sizes = [1] * pp
    for _ in range(num_layers - pp):
        p = min(range(pp), key=lambda q: (sizes[q] + extra[q], q))
        sizes[p] += 1
    bounds = np.concatenate(([0], np.cumsum(sizes))).tolist()
    return [range(bounds[p], bounds[p + 1]) for p in range(pp)]


def stage_costs(stages: list[range], *, first_extra: float = 0.0, last_extra: float = 0.0) -> list[float]:
    """Cost of each stage of ``stages`` in blocks: its blocks plus the first/last stage's extra."""
    costs = [float(len(r)) for r in stages]
    costs[0] += first_extra
    costs[-1] += last_extra
    return costs


def stage_imbalance(stages: list[range], *, first_extra: float = 0.0, last_extra: float = 0.0) -> float:
    """Slowest stage over the mean stage, ``max_p cost_p / (Σ_p cost_p / pp)`` (≥ 1): what a
    pipeline loses against ``pp`` equal stages, which the planner assumes."""
    costs = stage_costs(stages, first_extra=first_extra, last_extra=last_extra)
    return max(costs) * len(costs) / sum(costs)


def block_flops_per_token(*, hidden_size: int, ffn_hidden_size: int, num_heads: int, num_kv_heads: int,
                          tp: int = 1, seq_len: int = REPRESENTATIVE_SEQ_LEN) -> float:
    """Forward FLOPs per token of one transformer block on one rank of ``tp`` (module docstring)."""
    h, f = hidden_size, ffn_hidden_size
    kv = num_kv_heads * (h // num_heads)
    return (2 * h * (2 * h + 2 * kv) + 2 * 3 * h * f + 2 * h * seq_len) / tp


def lm_head_blocks(*, hidden_size: int, ffn_hidden_size: int, num_heads: int, num_kv_heads: int, vocab_size: int,
                   tp: int = 1, seq_len: int = REPRESENTATIVE_SEQ_LEN) -> float:
    """The last stage's extra work — the LM head and the loss on the busiest tp rank's ``⌈V/tp⌉``
    vocabulary rows — in blocks of :func:`block_flops_per_token` on one rank of ``tp`` (module
    docstring): ``last_extra`` of :func:`split_stages`."""
    head = (2 * hidden_size + LOSS_FLOPS_PER_LOGIT) * -(-vocab_size // tp)
    block = block_flops_per_token(hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, tp=tp, seq_len=seq_len)
    return head / block


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
