"""How global batches are formed and planned (:class:`SamplerConfig`) and what the over-long
policy and ``drop_last`` did (:class:`SamplerStats`); shared by the map-style sampler and the
streaming loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .pieces import OVERLONG_POLICIES
from .planning import PLAN_SYNC_MODES

__all__ = ["STREAM_SPLITS", "SamplerConfig", "SamplerStats"]

STREAM_SPLITS = ("replicated", "per_rank")
"""How a streaming dataset feeds the ranks (see :mod:`dataloader.stream`)."""


@dataclass(kw_only=True)
class SamplerConfig:
    """How global batches are formed and planned. Give exactly one of the two budgets."""

    tokens_per_step: int | None = None
    """Global batch budget in tokens (all ranks together); batches take samples until the next would exceed it."""
    sequences_per_step: int | None = None
    """Global batch size in samples (all ranks together)."""
    seed: int = 0
    """Seed of the per-epoch shuffle (the order of epoch ``e`` comes from ``(seed, e)``)."""
    shuffle: bool = True
    """Shuffle every epoch; ``False`` keeps dataset order."""
    overlong: str = "error"
    """Policy for samples above ``max_length`` tokens: ``error``, ``truncate``, ``split`` or ``drop``."""
    max_length: int | None = None
    """Over-long threshold in tokens; ``None`` = the balancer's ``max_sequence_length``."""
    drop_last: bool = False
    """Skip a partial final batch per epoch (counted in the stats); see the module docstring."""
    plan_ahead: int = 2
    """Steps planned in the background ahead of the consumer."""
    plan_sync: str = "auto"
    """``none`` (nothing exchanged or checked), ``verify`` (every rank plans; batch fingerprints and
    plan digests are all-gathered), ``broadcast`` (rank 0 plans; batch fingerprints are checked), or
    ``auto``: ``broadcast`` on several ranks (which needs an initialised torch.distributed), ``none``
    on one. See docs/dataloader.md for what each guarantees."""
    sync_timeout_s: float | None = None
    """Seconds a plan exchange waits for a peer before every rank fails; ``None``: the default
    process group's timeout (``init_process_group(timeout=...)``)."""
    stream_split: str = "replicated"
    """Streaming datasets only. ``replicated``: every rank reads the whole, same stream (a stream
    split per rank is refused at its first step). ``per_rank``: every rank reads its own shard
    (``split_dataset_by_node``, ``IterableDataset.shard``, per-rank files) with the local budget
    ``tokens_per_step // world_size`` or ``sequences_per_step / world_size``; the ranks exchange
    lengths and samples every step (see docs/dataloader.md, *Streaming datasets*)."""

    def __post_init__(self) -> None:
        if (self.tokens_per_step is None) == (self.sequences_per_step is None):
            raise ValueError(
                "SamplerConfig: give exactly one of tokens_per_step (e.g. 1_048_576) or sequences_per_step (e.g. 512); "
                f"got tokens_per_step={self.tokens_per_step}, sequences_per_step={self.sequences_per_step}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SamplerConfig: seed={self.seed!r} must be an integer >= 0 (the same on every rank)")
        t = self.sync_timeout_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf")):
            raise ValueError(f"SamplerConfig: sync_timeout_s={self.sync_timeout_s!r} must be a number of seconds > 0 (or None)")
        for name in ("tokens_per_step", "sequences_per_step", "max_length", "plan_ahead"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"SamplerConfig: {name}={v!r} must be a positive integer")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"SamplerConfig: overlong={self.overlong!r}; choose one of {list(OVERLONG_POLICIES)}")
        if self.plan_sync not in (*PLAN_SYNC_MODES, "auto"):
            raise ValueError(f"SamplerConfig: plan_sync={self.plan_sync!r}; choose one of {[*PLAN_SYNC_MODES, 'auto']}")
        if self.stream_split not in STREAM_SPLITS:
            raise ValueError(
                f"SamplerConfig: stream_split={self.stream_split!r}; choose one of {list(STREAM_SPLITS)} ('per_rank' "
                "when each rank reads its own shard of the stream)"
            )
        if self.overlong == "split" and self.max_length == 1:
            raise ValueError("SamplerConfig: overlong='split' needs max_length >= 2 (pieces overlap by one token)")


@dataclass
class SamplerStats:
    """What the over-long policy and ``drop_last`` did (all counts in samples unless named tokens), and, for a
    streaming dataset, where the planning thread's time went (seconds, summed since the loader was built).

    The counters cover this process's loader only: like the other stats they are not part of
    ``state_dict`` (a resumed loader starts them at zero) and they include work done ahead of
    the training loop (``plan_ahead`` steps). Measuring costs two clock reads per sample read
    and per exchange or collective; nothing is synchronised for it.
    """

    num_samples: int = 0
    num_kept: int = 0
    dropped_overlong: int = 0
    dropped_overlong_ids: list[int] = field(default_factory=list)
    """First few dropped sample ids (at most 16)."""
    truncated: int = 0
    truncated_tokens: int = 0
    split: int = 0
    extra_pieces: int = 0
    dropped_last_samples: int = 0
    """Samples skipped by ``drop_last`` so far (summed over epochs iterated)."""
    received_sample_bytes: int = 0
    """``stream_split='per_rank'``: bytes of pickled samples this rank received from the others so far."""
    read_seconds: float = 0.0
    """Streaming: CPU seconds (``time.thread_time``) of the reading thread inside the stream's ``next`` —
    the dataset's own work (decoding, tokenising, parsing; time blocked on I/O is not CPU), resume skips included."""
    exchange_seconds: float = 0.0
    """``stream_split='per_rank'``: CPU seconds (``time.thread_time``) of the planning thread pickling the
    samples it sends, in the ``all_to_all_single`` call and unpickling what it received (0 for ``replicated``)."""
    collective_seconds: float = 0.0
    """Streaming: wall seconds (``time.perf_counter``) inside the plan group's collectives — the per-rank
    share and outcome all-gathers, the plan broadcast, the all-to-all of samples — waiting for peers included
    (0 with ``plan_sync='none'``)."""
    plan_seconds: float = 0.0
    """Streaming: wall seconds the planner took for the steps this rank built (``StepPlan.plan_seconds``;
    under ``plan_sync='broadcast'`` rank 0's, carried in the plan)."""
