"""The split rules of the peer systems, as pure functions over one global batch (tokens).

Each reproduces a real system's behaviour exactly where the system defines it; the
fixtures in ``tests/fixtures/baselines/`` hold the systems' own answers:

* :func:`length_grouped_order` — transformers' ``get_length_grouped_indices``;
* :func:`dp_balanced_groups` — Megatron-LM's ``DpBalancedScheduler``;
* :func:`rows_per_rank` — TRL / OLMo-core / multipack: one packed row per rank per
  micro-step.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from packers.types import group_by_bin

__all__ = ["PeerRefusal", "dp_balanced_groups", "length_grouped_order", "rows_per_rank"]


class PeerRefusal(ValueError):
    """The real system refuses this batch (it asserts or fails on it); the message says why.

    A baseline reproduces that instead of inventing a fallback; the simulator reports the
    policy as refused rather than scoring it.
    """


def length_grouped_order(
    lengths: np.ndarray, batch_size: int, permutation: np.ndarray, mega_batch_mult: int | None = None
) -> np.ndarray:
    """transformers' ``group_by_length`` order of ``lengths`` given its random ``permutation``.

    The permutation is cut into mega-batches of ``mult · batch_size`` (default ``mult =
    min(n // (4·batch_size), 50)``, at least 1); each is sorted by decreasing length,
    ties in permutation order; then the first element of the mega-batch holding the
    longest sequence (the first such mega-batch) trades places with the very first
    element, so the longest sequence runs first.
    """
    s = np.asarray(lengths, dtype=np.int64)
    perm = np.asarray(permutation, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 sequence")
    if perm.shape != s.shape or (perm.size and not np.array_equal(np.sort(perm), np.arange(s.size))):
        raise ValueError(f"permutation must be a permutation of 0..{s.size - 1}")
    if mega_batch_mult is None:
        mega_batch_mult = max(1, min(s.size // (batch_size * 4), 50))
    mega = mega_batch_mult * batch_size
    blocks = [perm[i : i + mega] for i in range(0, perm.size, mega)]
    blocks = [b[np.argsort(-s[b], kind="stable")] for b in blocks]
    if blocks:
        top = int(np.argmax([s[b[0]] for b in blocks]))
        blocks[0][0], blocks[top][0] = blocks[top][0], blocks[0][0]
    return np.concatenate(blocks) if blocks else perm


def dp_balanced_groups(lengths: np.ndarray, capacity: int, num_ranks: int) -> list[list[int]]:
    """Megatron-LM's ``DpBalancedScheduler``: packed groups, a multiple of ``num_ranks`` of them.

    Next-fit in the given order into groups of ``capacity`` tokens. While the group count
    is not a multiple of ``num_ranks``: the last sequence of the last group that holds
    more than one (scanning back from the end) moves into a new one-sequence group
    appended at the end. Group ``k·num_ranks + d`` is micro-batch ``k`` of rank ``d``.
    Megatron asserts when it would have to split the first group; so does this
    (:class:`PeerRefusal`), e.g. when the whole batch fits one group.
    """
    s = np.asarray(lengths, dtype=np.int64)
    groups: list[list[int]] = []
    used = capacity + 1
    for p, n in enumerate(s.tolist()):
        if used + n > capacity:
            groups.append([])
            used = 0
        groups[-1].append(p)
        used += n
    missing = -len(groups) % num_ranks
    i = len(groups) - 1
    while missing:
        if i <= 0:
            raise PeerRefusal(
                f"megatron_dp_balanced: Megatron's DpBalancedScheduler refuses this batch ('Not enough samples "
                f"to move'): {s.size} sequences, {int(s.sum())} tokens, in groups of {capacity} tokens cannot "
                f"be cut into a multiple of {num_ranks} groups without splitting the first; give each step "
                "more tokens or use fewer data-parallel ranks"
            )
        if len(groups[i]) > 1:
            groups.append([groups[i].pop()])
            missing -= 1
        else:
            i -= 1
    return groups


def rows_per_rank(
    pack: Callable[[np.ndarray, int], Any], lengths: np.ndarray, capacity: int, num_ranks: int
) -> list[np.ndarray]:
    """Packed rows (positions) for "one row per rank per micro-step".

    ``pack`` packs at the full ``capacity`` first; when its row count is a multiple of
    ``num_ranks`` those rows are kept (the peer's own packing). Otherwise, with ``k`` =
    rows rounded up to a multiple of ``num_ranks`` (divided by it), the row length is
    lowered to the smallest (found by bisection from ``max(longest, ⌈tokens / (k·R)⌉)``)
    at which ``pack`` needs at most ``k·R`` rows, so every rank gets ``k`` rows of
    nearly equal tokens. Rows are in packing order.
    """
    s = np.asarray(lengths, dtype=np.int64)

    def rows(cap: int) -> Any:
        return pack(s, cap)

    full = rows(capacity)
    if full.num_bins % num_ranks == 0:
        chosen = full
    else:
        target = -(-int(full.num_bins) // num_ranks) * num_ranks
        lo = max(int(s.max()), -(-int(s.sum()) // target))
        hi = capacity  # invariant: rows(hi) needs at most target rows
        while lo < hi:
            mid = (lo + hi) // 2
            if rows(mid).num_bins <= target:
                hi = mid
            else:
                lo = mid + 1
        chosen = full if hi == capacity else rows(hi)
    return group_by_bin(np.asarray(chosen.bin_of), int(chosen.num_bins))
