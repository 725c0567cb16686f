"""``BalancedDataLoader``: keep your model, framework and dataset; swap the DataLoader.

Each iteration yields one :class:`StepBatch` per optimizer step: the step's plan, this
rank's micro-batches (collated), and the global loss-token count for exact loss
normalisation::

    loader = BalancedDataLoader(dataset, balancer=balancer, tokens_per_step=1 << 20, num_workers=4)
    for batch in loader:
        for k, mb in enumerate(batch.micro_batches):
            with batch.sync_context(model, k):          # no_sync() on all but the last
                logits = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"]).logits
                loss = packed_loss(logits, mb, grad_divisor=world)  # DDP averages over `world` ranks
                loss.backward()
        optimizer.step(); optimizer.zero_grad()

Map-style datasets: planning runs ahead in a background thread (``plan_ahead`` steps),
paced to start further plans while the loop holds a yielded step (its training step) or
when nothing planned is left, and real ``torch.utils.data.DataLoader`` workers fetch and
collate the micro-batches (the micro-batches are the DataLoader's batches, so
``num_workers`` workers fetch them in parallel). Iterable datasets
(``torch.utils.data.IterableDataset``, Hugging Face streaming): see
:mod:`dataloader.stream`.

Resuming: :meth:`BalancedDataLoader.state_dict` records the steps *consumed* by the
training loop (not the ones prefetched). Iterating again after a ``break`` continues
after the last consumed step, the same as loading that state into a fresh loader.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch.utils.data as tud

from .batch import SEQUENCE_KEYS, StepBatch
from .collate import PackedCollator
from .config import SamplerConfig
from .fetch import INLINE_BYTES_PINNED, CollateSpec, FetchDataset, SpecFeed, unship
from .lengths import IGNORE_INDEX, compute_lengths, compute_loss_tokens
from .lookahead import lookahead_steps
from .planning import PlanSyncError
from .sampler import BalancedBatchSampler, SamplerStep
from .scan import scan_dataset
from .spec import MicroBatchSpec
from .stream import StreamingSteps

__all__ = ["BalancedDataLoader"]

_STATE_VERSION = 1
_CLOSE_TIMEOUT = 30.0
"""Seconds a broken-off iteration waits for its planning thread to finish the stop exchange."""


def _is_iterable_dataset(dataset: Any) -> bool:
    if isinstance(dataset, tud.IterableDataset):
        return True
    cls = type(dataset)
    return cls.__name__ == "IterableDataset" and cls.__module__.startswith("datasets")


def _labels_piece_counter(dataset: Any, labels_key: str) -> Callable[[int, np.ndarray, np.ndarray], np.ndarray]:
    def count(sample_id: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        sample = dataset[int(sample_id)]
        if not isinstance(sample, Mapping) or labels_key not in sample:
            raise ValueError(
                f"sample {sample_id} is cut by the over-long policy and its loss tokens are custom, but it has no "
                f"{labels_key!r} field to count them from; give labels in the samples or use overlong='error'/'drop'"
            )
        labels = np.asarray(sample[labels_key])
        carries = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
        return (carries[ends] - carries[np.minimum(starts + 1, ends)]).astype(np.int64)

    return count


class BalancedDataLoader:
    """One :class:`StepBatch` per optimizer step, balanced by a :class:`~balancer.selector.Balancer`.

    Build from a dataset::

        BalancedDataLoader(dataset, balancer=b, lengths=None, tokens_per_step=65536, num_workers=2)

    or from an existing loader with :meth:`wrap`. ``lengths``: any source accepted by
    :func:`dataloader.lengths.compute_lengths` (default: the ``input_key`` column of a
    Hugging Face dataset; any other map-style dataset is read once, every sample, by
    :func:`dataloader.scan.scan_dataset`). ``loss_tokens``: per-sample loss tokens, a
    labels column name, or ``None`` — then a Hugging Face dataset with a ``labels_key``
    column is counted (:func:`~dataloader.lengths.compute_loss_tokens`), a read dataset's
    samples with ``labels_key`` likewise, otherwise ``length − 1``.
    ``collate_fn``: a hydraulis :class:`~dataloader.collate.Collator` (default
    :class:`~dataloader.collate.PackedCollator`) or any ``fn(samples)``; an idle replica's
    empty micro-batch is collated by hydraulis collators to ``T = 0`` and is ``None`` for
    plain functions. Sampler options (``tokens_per_step``, ``sequences_per_step``, ``seed``,
    ``shuffle``, ``overlong``, ``max_length``, ``drop_last``, ``plan_ahead``, ``plan_sync``,
    ``sync_timeout_s``, ``stream_split``) go in ``config`` or as keywords. The remaining
    keywords are the DataLoader's own.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        balancer: Any = None,
        lengths: Any = None,
        loss_tokens: Any = None,
        config: SamplerConfig | None = None,
        sampler: BalancedBatchSampler | None = None,
        collate_fn: Any = None,
        input_key: str = "input_ids",
        labels_key: str = "labels",
        sequence_keys: Sequence[str] = SEQUENCE_KEYS,
        rank: int | None = None,
        world_size: int | None = None,
        process_group: Any = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        timeout: float = 0,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise ValueError(f"give sampler options either in config or as keywords, not both: {sorted(options)}")
        self.dataset = dataset
        self.collate_fn = collate_fn if collate_fn is not None else PackedCollator(input_key=input_key, labels_key=labels_key)
        self.input_key, self.labels_key = input_key, labels_key
        self.streaming = _is_iterable_dataset(dataset)
        if self.streaming:
            if sampler is not None:
                raise ValueError("an iterable (streaming) dataset cannot use a BalancedBatchSampler (it needs lengths up front)")
            if balancer is None:
                raise ValueError("BalancedDataLoader needs balancer=... (a balancer.selector.Balancer)")
            if lookahead_steps(balancer):
                raise ValueError(
                    f"look-ahead (BalancerConfig.lookahead_steps={balancer.config.lookahead_steps}) regroups windows of "
                    "global batches and needs a map-style dataset (lengths up front); a streaming dataset is planned "
                    "step by step: build the balancer with lookahead_steps=0, or index the dataset"
                )
            if num_workers:
                warnings.warn(
                    f"num_workers={num_workers} is not used for a streaming dataset: the stream is read, planned and "
                    "collated in one background thread (see dataloader.stream)",
                    stacklevel=2,
                )
            self._stream = StreamingSteps(
                dataset,
                balancer,
                config if config is not None else SamplerConfig(**options),
                collate=self.collate_fn,
                input_key=input_key,
                labels_key=labels_key,
                sequence_keys=sequence_keys,
                rank=rank,
                world_size=world_size,
                process_group=process_group,
                pin_memory=pin_memory,
            )
            return
        if sampler is None:
            if balancer is None:
                raise ValueError("BalancedDataLoader needs balancer=... (a balancer.selector.Balancer) or sampler=...")
            config = config or SamplerConfig(**options)
            if config.stream_split != "replicated":
                raise ValueError(
                    f"stream_split={config.stream_split!r} applies to streaming (iterable) datasets; this map-style "
                    "dataset is indexed by the plan on every rank: pass the whole dataset on every rank (not a per-rank "
                    "shard) and leave stream_split='replicated'"
                )
            sampler = self._build_sampler(
                dataset, balancer, lengths, loss_tokens, input_key, labels_key, config, rank, world_size, process_group,
            )
        elif len(sampler.lengths) != len(dataset):
            raise ValueError(f"the sampler has lengths for {len(sampler.lengths)} samples but the dataset has {len(dataset)}")
        self.sampler = sampler
        self._training = threading.Event()
        """Set while the training loop holds a yielded step: background planning works then (PlanStream ``pace``)."""
        sampler._pace = self._training
        self._feed = SpecFeed(sampler)
        self._loader = tud.DataLoader(
            FetchDataset(dataset, input_key, sequence_keys),
            batch_sampler=self._feed,  # type: ignore[arg-type]
            collate_fn=CollateSpec(self.collate_fn, INLINE_BYTES_PINNED if pin_memory else None),
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            worker_init_fn=worker_init_fn,
            multiprocessing_context=multiprocessing_context,
            timeout=timeout,
        )
        self._consumed = (sampler.epoch, sampler._start_step, sampler._global_step)
        self._consumed_strategy: str | None = sampler._last_strategy
        self._broken = False

    def _consumed_state(self) -> dict[str, Any]:
        return self.sampler.state_at(*self._consumed, previous_strategy=self._consumed_strategy)

    @staticmethod
    def _build_sampler(
        dataset: Any,
        balancer: Any,
        lengths: Any,
        loss_tokens: Any,
        input_key: str,
        labels_key: str,
        config: SamplerConfig,
        rank: int | None,
        world_size: int | None,
        group: Any,
    ) -> BalancedBatchSampler:
        hf = hasattr(dataset, "_fingerprint") and hasattr(dataset, "column_names")
        if lengths is None and not hf:
            scanned = scan_dataset(dataset, input_key=input_key, labels_key=labels_key)
            lens = scanned.lengths
            if loss_tokens is None:
                loss_tokens = scanned.loss_tokens
        else:
            lens = compute_lengths(lengths, dataset=dataset)
        if isinstance(loss_tokens, str):
            loss, labels_key = compute_loss_tokens(dataset, loss_tokens), loss_tokens
        elif loss_tokens is None and hf and labels_key in dataset.column_names:
            loss = compute_loss_tokens(dataset, labels_key)
        else:
            loss = loss_tokens
        return BalancedBatchSampler(
            lens,
            balancer,
            config,
            loss_tokens=loss,
            piece_loss_tokens=_labels_piece_counter(dataset, labels_key),
            rank=rank,
            world_size=world_size,
            process_group=group,
        )

    @classmethod
    def wrap(
        cls,
        loader: tud.DataLoader,  # type: ignore[type-arg]
        *,
        lengths: Any = None,
        balancer: Any,
        collate_fn: Any = "keep",
        **kwargs: Any,
    ) -> "BalancedDataLoader":
        """A balanced loader over ``loader``'s dataset, keeping its worker settings and collate_fn.

        Keeps ``dataset``, ``collate_fn`` (unless it is torch's default, which cannot batch
        variable-length samples: then :class:`~dataloader.collate.PackedCollator`),
        ``num_workers``, ``pin_memory``, ``prefetch_factor``, ``persistent_workers``,
        ``worker_init_fn``, ``multiprocessing_context`` and ``timeout``. Its sampler and
        batch size are replaced by the balanced plan.
        """
        if isinstance(collate_fn, str) and collate_fn == "keep":
            keep = loader.collate_fn
            collate_fn = None if keep in (tud.default_collate, tud.default_convert) else keep
        kept = {
            "num_workers": loader.num_workers,
            "pin_memory": loader.pin_memory,
            "prefetch_factor": loader.prefetch_factor if loader.num_workers > 0 else None,
            "persistent_workers": loader.persistent_workers,
            "worker_init_fn": loader.worker_init_fn,
            "multiprocessing_context": loader.multiprocessing_context,
            "timeout": loader.timeout,
        }
        kept.update({k: v for k, v in kwargs.items() if k in kept})
        rest = {k: v for k, v in kwargs.items() if k not in kept}
        return cls(loader.dataset, balancer=balancer, lengths=lengths, collate_fn=collate_fn, **kept, **rest)

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StepBatch]:
        if self.streaming:
            yield from self._stream
            return
        if self._broken:  # continue after the last step the loop consumed
            self.sampler.load_state_dict(self._consumed_state())
        self._broken = True
        completed = self.sampler.completed_epochs
        inner = iter(self._loader)
        got: list[Any] = []
        specs: list[MicroBatchSpec] = []
        step: SamplerStep | None = None
        try:
            for spec, shipped in inner:
                out = unship(shipped)
                if step is None:
                    step = self._feed.steps.popleft()
                    if step.step != spec.step:
                        raise RuntimeError(f"micro-batch of step {spec.step} arrived while assembling step {step.step}")
                got.append(out)
                specs.append(spec)
                if spec.is_last:
                    batch = StepBatch(
                        step=step.step,
                        epoch=step.epoch,
                        step_in_epoch=step.step_in_epoch,
                        plan=step.plan,
                        rank_plan=step.rank_plan,
                        micro_batches=got,
                        specs=tuple(specs),
                        global_loss_tokens=step.global_loss_tokens,
                    )
                    got, specs, step = [], [], None
                    self._consumed = (batch.epoch, batch.step_in_epoch + 1, batch.step + 1)
                    self._consumed_strategy = batch.plan.strategy
                    self._training.set()
                    try:
                        yield batch
                    finally:
                        self._training.clear()
        finally:
            if self.sampler.completed_epochs > completed:
                self._consumed = (self.sampler.epoch, 0, self.sampler._global_step)
                self._broken = False
            else:  # broken off: stop planning now, not when the GC gets to it; peers break off too
                try:
                    self.sampler.close(timeout=_CLOSE_TIMEOUT)
                except PlanSyncError as e:
                    warnings.warn(f"{e}; call loader.close() on every rank before destroy_process_group", stacklevel=2)
            del inner

    def __len__(self) -> int:
        """Steps in the current epoch (map-style datasets only)."""
        if self.streaming:
            raise TypeError("a streaming BalancedDataLoader has no length (the stream's size is unknown)")
        return self.sampler.num_steps(self._consumed[0])

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at step 0 of ``epoch``."""
        if self.streaming:
            self._stream.set_epoch(epoch)
            return
        self.sampler.set_epoch(epoch)
        self._consumed = (self.sampler.epoch, 0, self.sampler._global_step)
        self._broken = False

    def close(self, timeout: float | None = 120.0) -> None:
        """Stop background planning (the peer ranks are told) and wait up to ``timeout`` s for it.

        Breaking out of the ``for`` loop does this by itself; call it on every rank before
        ``torch.distributed.destroy_process_group`` when an iterator is kept unfinished.
        """
        if self.streaming:
            self._stream.close(timeout)
        else:
            self.sampler.close(timeout)

    @property
    def stats(self) -> Any:
        """Over-long and ``drop_last`` counts (:class:`~dataloader.sampler.SamplerStats`)."""
        return self._stream.stats if self.streaming else self.sampler.stats

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position after the last step the training loop consumed; the sampler's state nested under ``"sampler"``."""
        if self.streaming:
            return {"version": _STATE_VERSION, "stream": self._stream.state_dict()}
        return {"version": _STATE_VERSION, "sampler": self._consumed_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Validate now, apply at the next ``__iter__``."""
        if not isinstance(state, Mapping):
            raise ValueError(
                f"cannot resume: the loader state must be a dict (what state_dict() returned), got {type(state).__name__}"
            )
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"cannot resume loader state version {state.get('version')!r} (expected {_STATE_VERSION})")
        key = "stream" if self.streaming else "sampler"
        if key not in state:
            other = "sampler" if self.streaming else "stream"
            hint = f" (it is a {'map-style' if self.streaming else 'streaming'} loader's state)" if other in state else ""
            raise ValueError(f"cannot resume: loader state has no {key!r} entry{hint}")
        if self.streaming:
            self._stream.load_state_dict(state["stream"])
            return
        inner = state["sampler"]
        self.sampler.load_state_dict(inner)  # checks every field
        self._consumed = (int(inner["epoch"]), int(inner["step_in_epoch"]), int(inner["global_step"]))
        self._consumed_strategy = dict(inner.get("balancer") or {}).get("previous_strategy")
        self._broken = False

