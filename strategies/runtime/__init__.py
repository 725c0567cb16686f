"""The bundled torch runtime: precompiled strategies, sharded model state, exact heterogeneous steps.

>>> device = init_distributed()                                    # torchrun environment
>>> engine = Engine(candidates, ModelConfig(...), lambda m: torch.optim.AdamW(m.parameters()))
>>> result = engine.step(plan, step_batch)                        # StepPlan + packed micro-batches
>>> balancer.observe(result.rank_seconds, plan)

See ``docs/runtime.md`` for the design (groups, sharded state, cp attention, kernels, pipelines).
"""

from strategies.kernels import (
    KERNELS,
    AttentionSegments,
    KernelSupport,
    available_kernels,
    build_segments,
    causal_attention,
    choose_kernel,
    kernel_support,
    reference_attention,
)

from .batch import IGNORE_INDEX, LocalBatch, check_micro_batch, prepare_micro_batch, shift_labels
from .checkpoint import load_state, save_state
from .compute import ComputeWeights, build_model
from .distributed import default_device, init_distributed
from .engine import Engine, StrategyView
from .engine_types import EngineConfig, StepResult
from .groups import GroupRegistry
from .local import free_port, run_local
from .model import GPT, ModelConfig, init_parameter
from .parallel import (
    SINGLE_DEVICE,
    ParallelContext,
    copy_to_tp,
    gather_from_cp,
    gather_from_tp,
    reduce_from_tp,
    tp_range,
)
from .pipeline import (
    PipelineStage,
    StageSpec,
    head_blocks,
    one_f_one_b,
    run_pipeline,
    split_layers,
    stage_forward,
)
from .state import ParamSlot, ShardedState, ShardLayout, tp_shard, unit_name
from .validate import StepError
from .vocab import vocab_parallel_cross_entropy, vocab_parallel_embedding

__all__ = [
    "AttentionSegments",
    "ComputeWeights",
    "Engine",
    "EngineConfig",
    "GPT",
    "GroupRegistry",
    "IGNORE_INDEX",
    "KERNELS",
    "KernelSupport",
    "LocalBatch",
    "ModelConfig",
    "ParallelContext",
    "ParamSlot",
    "PipelineStage",
    "SINGLE_DEVICE",
    "ShardLayout",
    "ShardedState",
    "StageSpec",
    "StepError",
    "StepResult",
    "StrategyView",
    "available_kernels",
    "build_model",
    "build_segments",
    "causal_attention",
    "check_micro_batch",
    "choose_kernel",
    "copy_to_tp",
    "default_device",
    "free_port",
    "gather_from_cp",
    "gather_from_tp",
    "head_blocks",
    "init_distributed",
    "init_parameter",
    "kernel_support",
    "load_state",
    "one_f_one_b",
    "prepare_micro_batch",
    "reduce_from_tp",
    "reference_attention",
    "run_local",
    "run_pipeline",
    "save_state",
    "shift_labels",
    "split_layers",
    "stage_forward",
    "tp_range",
    "tp_shard",
    "unit_name",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_embedding",
]
