"""Balanced, resumable data loading: length sources, the distributed sampler, collators.

See ``docs/dataloader.md``. Typical use::

    loader = BalancedDataLoader(dataset, balancer=balancer, tokens_per_step=1 << 20, num_workers=4)
    for batch in loader:                 # one StepBatch per optimizer step
        train_step(batch.micro_batches)  # your forward/backward per micro-batch
"""

from .batch import SEQUENCE_KEYS, StepBatch
from .collate import Collator, ContextParallelCollator, PackedCollator, PaddedCollator, block_causal_mask, cp_shard
from .config import SamplerConfig, SamplerStats
from .hf import HFPackingError, hf_packed_inputs
from .lengths import (
    IGNORE_INDEX,
    check_lengths,
    compute_lengths,
    compute_loss_tokens,
    lengths_from_arrow,
    lengths_from_callable,
    lengths_from_dataset,
    lengths_from_file,
)
from .loader import BalancedDataLoader
from .loss import normalize, packed_loss, target_loss_sum, token_loss_sum
from .planning import PlanSyncError
from .sampler import BalancedBatchSampler, SamplerStep
from .sources import DATA_SUFFIXES, LengthSource, read_dataset_lengths
from .spec import MicroBatchSpec
from .stream import StreamingSteps

__all__ = [
    "DATA_SUFFIXES",
    "LengthSource",
    "read_dataset_lengths",
    "SEQUENCE_KEYS",
    "IGNORE_INDEX",
    "BalancedBatchSampler",
    "BalancedDataLoader",
    "Collator",
    "ContextParallelCollator",
    "HFPackingError",
    "MicroBatchSpec",
    "PackedCollator",
    "PaddedCollator",
    "PlanSyncError",
    "SamplerConfig",
    "SamplerStats",
    "SamplerStep",
    "StepBatch",
    "StreamingSteps",
    "block_causal_mask",
    "check_lengths",
    "compute_lengths",
    "compute_loss_tokens",
    "cp_shard",
    "hf_packed_inputs",
    "lengths_from_arrow",
    "lengths_from_callable",
    "lengths_from_dataset",
    "lengths_from_file",
    "normalize",
    "packed_loss",
    "target_loss_sum",
    "token_loss_sum",
]
