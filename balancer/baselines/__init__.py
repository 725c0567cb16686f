"""Named baseline policies: how other systems split a global batch, scored by our cost model.

One module per policy family (``padded``, ``packing``, ``megatron``, ``wlb``,
``hydraulis``), the shared base and scoring, and the registry here.

Every policy turns one global batch (sequence lengths in tokens, with sample ids) into a
:class:`~strategies.plan.StepPlan` on a fixed strategy, so one scorer — the cost model's
replica time ``Σ_k T(m_k) + v·c + (pp−1)·max_k T(m_k)`` — applies to all of them and to
the :class:`~balancer.selector.Balancer`. Each is written from its published description
(see ``docs/baselines.md`` for sources and for how each maps onto our strategies):

* ``padded`` — random equal-count split, fixed-size micro-batches padded to their
  longest sequence (the Hugging Face ``Trainer`` default);
* ``length_grouped`` — transformers' ``group_by_length``: the epoch's order in sorted
  mega-batches (:meth:`BaselinePolicy.epoch_order`), micro-batches dealt round-robin;
* ``multipack`` — OpenChat's multipack sampler: FFD, one packed row per rank per micro-step;
* ``bfd`` — best-fit decreasing rows (TRL ``pack_dataset``, OLMo-core), one per rank per micro-step;
* ``megatron_dp_balanced`` — Megatron-LM's ``DpBalancedScheduler``: next-fit in sampler
  order, trailing sequences moved out until the groups are a multiple of R;
* ``megatron_hybrid_cp`` — megatron-core's ``BalancedCPScheduler`` (hybrid cp), exact;
* ``wlb_llm`` — WLB-LLM: outlier delay queue on a fixed token budget + least-workload greedy;
* ``hydraulis_random_restart`` — 50 shuffled orders, each placed greedily; best kept.

``tests/fixtures/baselines/`` holds what the real systems did on fixed batches, and the
tests replay it; ``docs/baselines.md`` says per policy what it reproduces and where it
differs.

Padding. ``padded`` and ``length_grouped`` run each micro-batch as a padded rectangle:
a micro-batch of ``v`` sequences padded to its longest sequence ``s_max`` costs
``v·t(s_max) + c`` seconds and ``v·s_max`` tokens of memory. A ``StepPlan`` holds sample
ids only, so its ``est_seconds`` stay the unpadded cost-model times (what
:func:`~strategies.plan.validate` recomputes); the padded time is what
:func:`score_plan` returns with ``padded=True`` and what :meth:`BaselinePolicy.score`
returns for these two policies. Simulations and benchmarks always use ``score``.

Every policy derives its randomness from ``(seed, step)``, so every rank computes the
same plan. Policies are stateless except ``wlb_llm``, whose outlier queue and backlog
carry sequences into later steps (``flush=True`` at the end of an epoch empties them);
it trains at most ``tokens_per_step`` tokens a step.
"""

from __future__ import annotations

from typing import Any

from strategies.layout import ClusterSpec, Strategy

from ..cost import CostModel
from .base import Assignment, BaselinePolicy
from .hydraulis import (
    HydraulisRandomRestartPolicy,
    Placement,
    greedy_dispatch,
    random_restart_dispatch,
)
from .megatron import MegatronDpBalancedPolicy, MegatronHybridCpPolicy
from .packing import BestFitPolicy, MultipackPolicy
from .padded import LengthGroupedPolicy, PaddedPolicy
from .rules import PeerRefusal
from .scoring import PlanScore, score_plan, strategy_lower_bound
from .static import static_layout, static_strategy
from .wlb import WlbLlmPolicy

__all__ = [
    "BASELINES",
    "Assignment",
    "BaselinePolicy",
    "BestFitPolicy",
    "HydraulisRandomRestartPolicy",
    "LengthGroupedPolicy",
    "MegatronDpBalancedPolicy",
    "MegatronHybridCpPolicy",
    "MultipackPolicy",
    "PaddedPolicy",
    "PeerRefusal",
    "Placement",
    "PlanScore",
    "WlbLlmPolicy",
    "baseline_fidelity",
    "baseline_names",
    "greedy_dispatch",
    "make_baseline",
    "random_restart_dispatch",
    "score_plan",
    "static_layout",
    "static_strategy",
    "strategy_lower_bound",
]


BASELINES: dict[str, type[BaselinePolicy]] = {
    "padded": PaddedPolicy,
    "length_grouped": LengthGroupedPolicy,
    "multipack": MultipackPolicy,
    "bfd": BestFitPolicy,
    "megatron_dp_balanced": MegatronDpBalancedPolicy,
    "megatron_hybrid_cp": MegatronHybridCpPolicy,
    "wlb_llm": WlbLlmPolicy,
    "hydraulis_random_restart": HydraulisRandomRestartPolicy,
}
"""Registry: baseline name → policy class (each accepts ``cluster, strategy, cost_model, **kw``)."""


def baseline_fidelity() -> dict[str, tuple[str, str]]:
    """Per baseline: the real system it reproduces and how closely (measured on the fixtures)."""
    return {name: (cls.system, cls.fidelity) for name, cls in BASELINES.items()}


def baseline_names() -> list[str]:
    """Names accepted by :func:`make_baseline`, in registry order."""
    return list(BASELINES)


def make_baseline(
    name: str,
    cluster: ClusterSpec,
    strategy: Strategy | None,
    cost_model: CostModel,
    **kw: Any,
) -> BaselinePolicy:
    """Build the baseline called ``name`` on ``strategy``.

    ``strategy=None`` picks :func:`static_strategy` for ``max_length`` (a keyword then
    required): the smallest model-parallel degree whose capacity holds the longest
    allowed sequence (``megatron_hybrid_cp`` prefers the layout with the most cp at that
    degree). Other keywords go to the policy (``seed``, ``max_length``,
    ``tokens_per_step``, ``micro_batch_size``, ``gradient_accumulation_steps``,
    ``restarts``, ``outlier_thresholds``, ``alpha``, ``beta``, ``max_delay``).
    """
    try:
        cls = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}") from None
    if strategy is None:
        max_length = kw.get("max_length")
        if max_length is None:
            raise ValueError(f"make_baseline({name!r}, strategy=None) needs max_length= to pick the static layout")
        strategy = static_strategy(cluster, cost_model, int(max_length), prefer_cp=name == "megatron_hybrid_cp")
    return cls(cluster, strategy, cost_model, **kw)
