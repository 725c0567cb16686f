"""The sampler's resume half: saving where an epoch stands and applying a saved state.

:class:`SamplerResume` is a base class of :class:`dataloader.sampler.BalancedBatchSampler`
(``self`` below is always the sampler). A state (torchdata's conventions: small,
versioned, children nested) names a position — epoch, step in the epoch, global step —
plus what must match to resume it exactly: the seed, the lengths' fingerprint, the
batching options, the world size, the balancer's own state and, with a look-ahead, the
rest of the current window. :meth:`~SamplerResume.load_state_dict` validates everything
at once (format in :mod:`dataloader.state`) and keeps a :class:`Pending` state that the
next ``__iter__`` applies (:meth:`~SamplerResume._apply_state`), at the ``max_length``
that reproduces the saved run's global batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import SamplerStats
from .pieces import build_pieces
from .state import (
    STATE_VERSION,
    Position,
    SavedState,
    balancer_state,
    cap_change,
    read_sampler_state,
)

__all__ = ["Pending", "SamplerResume"]

_LAST = object()
"""Sentinel: "the strategy of the last step yielded"."""


class SamplerResume:
    """``state_at``, ``state_dict``, ``load_state_dict`` of the sampler, and the pending state they keep."""

    def state_at(
        self, epoch: int, step_in_epoch: int, global_step: int, *, previous_strategy: str | None | object = _LAST
    ) -> dict[str, Any]:
        """The state that resumes at ``step_in_epoch`` of ``epoch`` (global step ``global_step``).

        ``previous_strategy``: strategy of the step before the resume point (the Balancer's
        switch penalty depends on it); default: the last step this sampler yielded. Planning
        runs ahead, so the Balancer's own record is usually a few steps further.
        """
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            **Position(int(epoch), int(step_in_epoch), int(global_step)).to_dict(),
            "seed": self.config.seed,
            "world_size": self.world_size,
            "num_samples": int(self.lengths.size),
            "lengths_fingerprint": self.fingerprint,
            "batching": self._batching(),
        }
        previous = self._last_strategy if previous_strategy is _LAST else previous_strategy
        child = balancer_state(self.balancer, previous)  # type: ignore[arg-type]
        if child is not None:
            state["balancer"] = child
        if self._lookahead is not None:
            state["lookahead"] = self._lookahead.state_at(int(epoch), int(step_in_epoch))
        return state

    def state_dict(self) -> dict[str, Any]:
        """Where the next ``__iter__`` continues: torchdata's conventions (small, versioned, children nested)."""
        return self.state_at(self.epoch, self._start_step, self._global_step)

    def _batching(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "tokens_per_step": cfg.tokens_per_step,
            "sequences_per_step": cfg.sequences_per_step,
            "shuffle": cfg.shuffle,
            "overlong": cfg.overlong,
            "max_length": self.max_length,
            "drop_last": cfg.drop_last,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Validate ``state`` now (every field, against this sampler's data and options); apply it at the next ``__iter__``."""
        saved = read_sampler_state(
            state, num_samples=self.lengths.size, fingerprint=self.fingerprint, seed=self.config.seed, batching=self._batching()
        )
        cap = self._resume_cap(saved.max_length)
        pieces = self._pieces if cap == self.max_length else build_pieces(
            self.lengths, self.loss_tokens, cap, self.config.overlong, SamplerStats(), self._piece_loss_tokens
        )
        at = saved.position
        steps = int(self._epoch_batches(at.epoch, pieces)[1].size - 1)
        if at.step_in_epoch > steps:
            raise ValueError(
                f"cannot resume: sampler state has step_in_epoch={at.step_in_epoch} but epoch {at.epoch} has only {steps} "
                "steps with these options; the state belongs to another run (or was edited)"
            )
        saved_la = state.get("lookahead")
        if self._lookahead is None:
            if dict(saved_la or {}).get("queue"):
                raise ValueError(
                    f"cannot resume: the state was saved inside a look-ahead window (lookahead_steps="
                    f"{saved_la.get('steps')}); build the balancer with BalancerConfig(lookahead_steps="
                    f"{saved_la.get('steps')}) to train the rest of that window as regrouped"
                )
            self._pending = Pending(saved, cap)
            return
        # The queue is checked against the sampled window, so with this sampler's pieces; at
        # another max_length it is checked once the pieces are rebuilt (next __iter__).
        window = self._lookahead.check_state(saved_la, at.epoch, at.step_in_epoch) if cap == self.max_length else _UNCHECKED
        self._pending = Pending(saved, cap, saved_la, window)

    def _resume_cap(self, saved: int) -> int:
        """The ``max_length`` that resumes the saved run's exact global batches (raises when none can)."""
        why = cap_change(self.lengths, self.config.overlong, saved, self.max_length)
        if why is None:
            return self.max_length
        if saved <= int(self.balancer.max_sequence_length):
            return saved
        raise ValueError(
            f"cannot resume: the run cut samples at max_length={saved} tokens but the new balancer holds at most "
            f"{int(self.balancer.max_sequence_length)}: {why}. Add a candidate with more capacity (more tp/cp), or "
            "start a new epoch with set_epoch instead of loading the state"
        )

    def _apply_state(self, pending: Pending) -> None:
        saved, cap = pending.saved, pending.max_length
        if cap != self.max_length:
            self.max_length = cap
            self.stats = SamplerStats(num_samples=self.lengths.size)
            self._pieces = self._build_pieces(cap, announce=False)
            self._cached_epoch = None
        self.epoch = saved.position.epoch
        self._start_step = saved.position.step_in_epoch
        self._global_step = saved.position.global_step
        if self._lookahead is not None:
            window = pending.lookahead_window
            if window is _UNCHECKED:
                window = self._lookahead.check_state(pending.lookahead, self.epoch, self._start_step)
            self._lookahead.load(self.epoch, self._start_step, window)  # type: ignore[arg-type]
        loader = getattr(self.balancer, "load_state_dict", None)
        if saved.balancer is not None and loader is not None:
            if saved.world_size == self.world_size:
                loader(saved.balancer)
            else:
                warnings.warn(
                    f"resuming on {self.world_size} ranks (was {saved.world_size}): the epoch continues with the same "
                    "global batches; the balancer's per-rank state (straggler speeds) starts fresh",
                    stacklevel=3,
                )


_UNCHECKED = object()
"""Sentinel: a look-ahead queue not yet checked against the sampled window."""


@dataclass(frozen=True, slots=True)
class Pending:
    """A validated state waiting for the next ``__iter__``, with the ``max_length`` that resumes it exactly."""

    saved: SavedState
    max_length: int
    lookahead: Any = None
    """The state's look-ahead queue (``"lookahead"``), as saved."""
    lookahead_window: Any = None
    """That queue checked against the sampled window (``_UNCHECKED`` until the pieces are right)."""
