"""The bundled torch runtime: precompiled strategies, reference GPT with TP/CP, exact gradient sync.

>>> device = init_distributed()                                    # torchrun environment
>>> engine = Engine(candidates, ModelConfig(...), lambda m: torch.optim.AdamW(m.parameters()))
>>> result = engine.step(plan, step_batch)                        # StepPlan + packed micro-batches
>>> balancer.observe(result.rank_seconds, plan)

See ``docs/runtime.md`` for the design (groups, split all-reduce, cp attention, state).
"""

from .attention import AttentionSegments, build_segments, causal_attention, flash_attention_available
from .batch import IGNORE_INDEX, LocalBatch, check_micro_batch, prepare_micro_batch, shift_labels
from .distributed import default_device, init_distributed
from .engine import Engine, EngineConfig, StepError, StepResult, StrategyView
from .grad_sync import GradientSync
from .groups import GroupRegistry, SyncBucket, block_holders, held_blocks, num_blocks_for, plan_buckets
from .local import free_port, run_local
from .model import GPT, ModelConfig
from .parallel import SINGLE_DEVICE, ParallelContext, copy_to_tp, gather_from_cp, reduce_from_tp

__all__ = [
    "AttentionSegments",
    "Engine",
    "EngineConfig",
    "GPT",
    "GradientSync",
    "GroupRegistry",
    "IGNORE_INDEX",
    "LocalBatch",
    "ModelConfig",
    "ParallelContext",
    "SINGLE_DEVICE",
    "StepError",
    "StepResult",
    "StrategyView",
    "SyncBucket",
    "block_holders",
    "build_segments",
    "causal_attention",
    "check_micro_batch",
    "copy_to_tp",
    "default_device",
    "flash_attention_available",
    "free_port",
    "gather_from_cp",
    "held_blocks",
    "init_distributed",
    "num_blocks_for",
    "plan_buckets",
    "prepare_micro_batch",
    "reduce_from_tp",
    "run_local",
    "shift_labels",
]
