"""Resume state of the sampler and of the streaming loader: versioned, tied to its data, range-checked.

A state is small (torchdata's conventions): counters, the batching options, a ``version``,
the balancer's state nested under ``"balancer"`` — and a fingerprint of the length source
it was saved on, so that a state never resumes on other data:

* map-style: ``lengths_fingerprint`` hashes the whole lengths array (8 bytes per sample;
  the global batches depend on nothing else of the data);
* streaming: ``consumed_fingerprint`` hashes the token counts of the samples the state
  skips on resume; the resumed run hashes them again while skipping and refuses to go on
  when they differ (another stream, order or tokenisation), or when the stream ends first.
  With ``stream_split='per_rank'`` the state holds one such count and fingerprint per
  rank (``shards``) and resumes on the same number of ranks only.

Loading checks every field — its type, its range and its consistency with the others
(``global_step = epoch_start_step + step_in_epoch``) — and every error names the field,
the value, the limit and the fix. Position checks that need the data (the number of steps
in the epoch) are the sampler's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "STATE_VERSION",
    "balancer_state",
    "LengthsHash",
    "Position",
    "SavedState",
    "cap_change",
    "check_batching",
    "lengths_fingerprint",
    "read_position",
    "read_sampler_state",
    "read_state",
    "read_stream_state",
    "state_int",
]

STATE_VERSION = 2
"""Version of the sampler's and the stream's state (2: fingerprints and ``epoch_start_step``)."""

_HASH = "blake2b"


def lengths_fingerprint(lengths: np.ndarray) -> str:
    """``blake2b:<hex>`` of the int64 lengths array (about 1 s per 10^8 samples; cache it)."""
    h = hashlib.blake2b(np.ascontiguousarray(lengths, dtype=np.int64).tobytes(), digest_size=16)
    return f"{_HASH}:{h.hexdigest()}"


class LengthsHash:
    """Running fingerprint of a stream's token counts, sample by sample (same bytes as :func:`lengths_fingerprint`)."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=16)

    def update(self, tokens: int) -> None:
        self._h.update(int(tokens).to_bytes(8, "little", signed=True))

    def hexdigest(self) -> str:
        return f"{_HASH}:{self._h.hexdigest()}"


# ---------------------------------------------------------------------------------------
# fields
# ---------------------------------------------------------------------------------------
def read_state(state: Any, what: str, required: set[str]) -> Mapping[str, Any]:
    """``state`` as a mapping of the current version holding every ``required`` key."""
    if not isinstance(state, Mapping):
        raise ValueError(
            f"cannot resume: the {what} state must be a dict (what state_dict() returned), got {type(state).__name__}"
        )
    version = state.get("version")
    if version != STATE_VERSION:
        older = " (saved by an earlier hydraulis, without a dataset fingerprint)" if version == 1 else ""
        raise ValueError(
            f"cannot resume {what} state version {version!r}{older}; this library reads version {STATE_VERSION}. "
            "Restart the epoch instead (set_epoch(epoch)) or resume with the hydraulis that saved it"
        )
    missing = required - set(state)
    if missing:
        raise ValueError(f"cannot resume: {what} state lacks {sorted(missing)}; pass the dict state_dict() returned")
    return state


def state_int(state: Mapping[str, Any], key: str, what: str, minimum: int = 0) -> int:
    """``state[key]`` as an int ``>= minimum``; anything else (``'x'``, ``2.5``, ``True``) names the field."""
    value = state[key]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"cannot resume: {what} state has {key}={value!r}; it must be an integer >= {minimum}")
    if value < minimum:
        raise ValueError(f"cannot resume: {what} state has {key}={value}; it must be >= {minimum}")
    return int(value)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a state resumes: step ``step_in_epoch`` of ``epoch``, global step ``global_step``."""

    epoch: int
    step_in_epoch: int
    global_step: int

    @property
    def epoch_start_step(self) -> int:
        """Global step of the epoch's first step."""
        return self.global_step - self.step_in_epoch

    def to_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_start_step": self.epoch_start_step,
        }


def read_position(state: Mapping[str, Any], what: str) -> Position:
    """Epoch and step counters, each a non-negative int, consistent with each other."""
    epoch = state_int(state, "epoch", what)
    step = state_int(state, "step_in_epoch", what)
    global_step = state_int(state, "global_step", what)
    start = state_int(state, "epoch_start_step", what)
    if global_step != start + step:
        raise ValueError(
            f"cannot resume: {what} state has global_step={global_step} but epoch_start_step + step_in_epoch = "
            f"{start} + {step} = {start + step}; the counters disagree (edited by hand?). Save the state again, or "
            "change them together"
        )
    return Position(epoch, step, global_step)


def check_batching(mine: Mapping[str, Any], state: Mapping[str, Any], what: str, *, skip: tuple[str, ...] = ()) -> Mapping[str, Any]:
    """The state's ``batching`` options; each must equal this loader's (except ``skip``)."""
    theirs = state["batching"]
    if not isinstance(theirs, Mapping):
        raise ValueError(f"cannot resume: {what} state has batching={theirs!r}; it must be a dict of the batching options")
    for key, value in mine.items():
        if key in skip:
            continue
        if key not in theirs:
            raise ValueError(f"cannot resume: {what} state's batching lacks {key!r}; pass the dict state_dict() returned")
        if theirs[key] != value:
            raise ValueError(
                f"cannot resume: {key} changed {theirs[key]!r} → {value!r}; the global batch sequence depends on it, "
                f"so build the loader with {key}={theirs[key]!r}"
            )
    return theirs


@dataclass(frozen=True, slots=True)
class SavedState:
    """A loaded state, every field checked: where it resumes, on how many ranks it was saved, its balancer child."""

    position: Position
    world_size: int
    balancer: Mapping[str, Any] | None
    max_length: int = 0
    """The run's over-long threshold in tokens (its ``batching``)."""
    samples_consumed: int = 0
    """Streams: samples of the epoch's stream consumed by finished steps."""
    consumed_fingerprint: str = ""
    """Streams: :class:`LengthsHash` of those samples' token counts."""
    shards: tuple[tuple[int, str], ...] = ()
    """Per-rank streams: ``(samples consumed, their fingerprint)`` of each rank's stream, by rank."""


def _common(state: Any, what: str, required: set[str], batching: Mapping[str, Any]) -> tuple[Mapping[str, Any], SavedState]:
    state = read_state(state, what, {"epoch", "step_in_epoch", "global_step", "epoch_start_step", "world_size", "batching", *required})
    position = read_position(state, what)
    world_size = state_int(state, "world_size", what, minimum=1)
    theirs = check_batching(batching, state, what, skip=("max_length",))
    if "max_length" not in theirs:
        raise ValueError(f"cannot resume: {what} state's batching lacks 'max_length'; pass the dict state_dict() returned")
    max_length = state_int(theirs, "max_length", f"{what} batching", minimum=1)
    child = state.get("balancer")
    if child is not None and not isinstance(child, Mapping):
        raise ValueError(f"cannot resume: {what} state has balancer={child!r}; it must be the balancer's state dict")
    return state, SavedState(position, world_size, child, max_length)


def read_sampler_state(
    state: Any, *, num_samples: int, fingerprint: str, seed: int, batching: Mapping[str, Any]
) -> SavedState:
    """Check a map-style sampler's state against this sampler's dataset size, lengths, seed and batching."""
    what = "sampler"
    state, saved = _common(state, what, {"seed", "num_samples", "lengths_fingerprint"}, batching)
    saved_samples = state_int(state, "num_samples", what)
    if saved_samples != num_samples:
        raise ValueError(f"cannot resume: the dataset had {saved_samples} samples, now {num_samples}; resume on the same dataset")
    if state["lengths_fingerprint"] != fingerprint:
        raise ValueError(
            f"cannot resume: the state was saved on a dataset whose lengths hash to {state['lengths_fingerprint']!r}, "
            f"this sampler's lengths hash to {fingerprint!r}: the dataset, its tokenisation or its order changed "
            "(same size, other token counts). Resume on the dataset the state was saved on, or start a new epoch with "
            "set_epoch instead of loading the state"
        )
    saved_seed = state_int(state, "seed", what)
    if saved_seed != seed:
        raise ValueError(f"cannot resume: seed changed {saved_seed} → {seed}; build the sampler with seed={saved_seed}")
    return saved


def read_stream_state(state: Any, *, batching: Mapping[str, Any], world_size: int = 1) -> SavedState:
    """Check a streaming loader's state: its counters agree, its batching options are this loader's; a
    ``stream_split='per_rank'`` state holds one consistent shard entry per rank and was saved on ``world_size`` ranks."""
    what = "stream"
    if isinstance(state, Mapping) and isinstance(state.get("batching"), Mapping) and "stream_split" not in state["batching"]:
        state = {**state, "batching": {**state["batching"], "stream_split": "replicated"}}  # saved before the option
    per_rank = batching.get("stream_split") == "per_rank"
    if isinstance(state, Mapping) and isinstance(state.get("batching"), Mapping):  # a changed split is named as such
        check_batching({"stream_split": batching.get("stream_split")}, state, what)
    state, saved = _common(state, what, {"samples_consumed", "shards" if per_rank else "consumed_fingerprint"}, batching)
    consumed = state_int(state, "samples_consumed", what)
    at = saved.position
    least = at.step_in_epoch * (1 if per_rank else int(batching.get("sequences_per_step") or 1))
    if consumed < least or (consumed > 0) != (at.step_in_epoch > 0):
        raise ValueError(
            f"cannot resume: stream state has samples_consumed={consumed} after step_in_epoch={at.step_in_epoch} "
            f"finished steps; {at.step_in_epoch} steps consume at least {least} samples and none consume 0. The "
            "counters disagree (edited by hand?)"
        )
    if not per_rank:
        fingerprint = _fingerprint(state["consumed_fingerprint"], "consumed_fingerprint")
        return SavedState(at, saved.world_size, saved.balancer, saved.max_length, consumed, fingerprint)
    shards = _read_shards(state["shards"], saved.world_size, consumed)
    if saved.world_size != world_size:
        raise ValueError(
            f"cannot resume: the stream_split='per_rank' state was saved on world_size={saved.world_size} ranks, this "
            f"loader runs on {world_size}: each rank's position (shards[r]) is in its own shard of the stream. Resume on "
            f"{saved.world_size} ranks with the same shards, or start a new epoch with set_epoch"
        )
    return SavedState(at, saved.world_size, saved.balancer, saved.max_length, consumed, "", shards)


def _fingerprint(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.startswith(f"{_HASH}:"):
        raise ValueError(f"cannot resume: stream state has {field}={value!r}; expected '{_HASH}:<hex>'")
    return value


def _read_shards(shards: Any, world_size: int, consumed: int) -> tuple[tuple[int, str], ...]:
    """``shards``: one ``{samples_consumed, consumed_fingerprint}`` per rank, summing to ``samples_consumed``."""
    if not isinstance(shards, (list, tuple)) or len(shards) != world_size:
        got = f"{len(shards)} entries" if isinstance(shards, (list, tuple)) else repr(shards)
        raise ValueError(
            f"cannot resume: stream state has shards={got}; it must be a list of one entry per rank "
            f"(world_size={world_size}). Pass the dict state_dict() returned"
        )
    out = []
    for r, entry in enumerate(shards):
        if not isinstance(entry, Mapping) or {"samples_consumed", "consumed_fingerprint"} - set(entry):
            raise ValueError(
                f"cannot resume: stream state has shards[{r}]={entry!r}; it must be a dict with samples_consumed and "
                "consumed_fingerprint"
            )
        n = state_int(entry, "samples_consumed", f"stream shards[{r}]")
        out.append((n, _fingerprint(entry["consumed_fingerprint"], f"shards[{r}].consumed_fingerprint")))
    total = sum(n for n, _ in out)
    if total != consumed:
        raise ValueError(
            f"cannot resume: stream state has samples_consumed={consumed} but its shards sum to {total}; the counters "
            "disagree (edited by hand?)"
        )
    return tuple(out)


def cap_change(lengths: np.ndarray, policy: str, saved_cap: int, new_cap: int) -> str | None:
    """Why resuming with ``new_cap`` would change the batches a run cut at ``saved_cap`` tokens; ``None``: it would not.

    ``error`` cuts nothing at either cap (the sampler raises for any sample above its own
    cap); ``drop`` changes only samples between the caps; ``truncate``/``split`` every
    sample above the smaller one.
    """
    if saved_cap == new_cap or policy == "error":
        return None
    lo, hi = sorted((saved_cap, new_cap))
    affected = (lengths > lo) & (lengths <= hi) if policy == "drop" else lengths > lo
    ids = np.flatnonzero(affected)
    if ids.size == 0:
        return None
    i = int(ids[0])
    verb = {"drop": "dropped", "truncate": "truncated", "split": "split"}[policy]
    return (
        f"{ids.size} sample(s) (e.g. sample {i} with {int(lengths[i])} tokens) would be {verb} differently at "
        f"max_length={new_cap} than at the run's max_length={saved_cap}"
    )


def balancer_state(balancer: Any, previous_strategy: str | None) -> dict[str, Any] | None:
    """The balancer's state with ``previous_strategy`` set to the last *consumed* step's strategy.

    The balancer plans ahead, so its own record names a step the training loop has not
    reached; resuming with it could change the switch penalty of the next plan.
    """
    get = getattr(balancer, "state_dict", None)
    if get is None:
        return None
    state = dict(get())
    if "previous_strategy" in state:
        state["previous_strategy"] = previous_strategy
    return state
