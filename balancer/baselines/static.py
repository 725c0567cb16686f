"""Static layout: what a system without per-step strategy selection would run."""

from __future__ import annotations

from typing import Any, Sequence

from strategies.layout import ClusterSpec, Layout, Strategy

from ..candidates import enumerate_layouts
from ..cost import CostModel

__all__ = ["static_layout", "static_strategy"]




def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def _priced(cost_model: CostModel, layout: Layout) -> bool:
    """Whether the cost model can price ``layout`` (an analytic model may refuse some)."""
    if not cost_model.supports(layout):
        return False
    try:
        cost_model.cost(layout)
    except ValueError:
        return False
    return True


def static_layout(
    cluster: ClusterSpec,
    cost_model: CostModel,
    max_length: int,
    *,
    layouts: Sequence[Layout] | None = None,
    prefer_cp: bool = False,
) -> Layout:
    """The homogeneous layout a static system would pick for sequences up to ``max_length``.

    That is the layout with the smallest model-parallel degree ``tp·cp·pp`` whose token
    capacity holds one ``max_length``-token sequence. Ties (same degree) go to the layout
    that runs that sequence fastest, or with ``prefer_cp`` to the one with the largest
    ``cp`` and ``pp = 1`` (the static layout a context-parallel system such as Megatron's
    hybrid CP starts from). ``layouts`` defaults to
    :func:`balancer.candidates.enumerate_layouts` (power-of-two tp/cp layouts that fit
    the cluster and memory, no pipeline): the layouts the Balancer's candidates use.
    """
    if max_length < 1:
        raise ValueError(f"static_layout: max_length={max_length} must be >= 1 token")
    pool = list(layouts) if layouts is not None else enumerate_layouts(cluster, cost_model)
    fits = [
        lay
        for lay in pool
        if cluster.num_ranks % lay.size == 0
        and _priced(cost_model, lay)
        and cost_model.token_capacity(lay) >= max_length
        and not (prefer_cp and lay.pp > 1)
    ]
    if not fits:
        best = max((cost_model.token_capacity(lay) for lay in pool if _priced(cost_model, lay)), default=0)
        raise ValueError(
            f"no layout on {cluster.num_ranks} ranks holds a {max_length}-token sequence "
            f"(largest capacity {best} tokens); lower max_length or add larger layouts to the cost model"
        )

    def key(lay: Layout) -> tuple[Any, ...]:
        if prefer_cp:
            return (lay.size, -lay.cp, lay.tp, lay.name)
        return (lay.size, cost_model.replica_seconds([[max_length]], lay), lay.name)

    return min(fits, key=key)


def static_strategy(
    cluster: ClusterSpec,
    cost_model: CostModel,
    max_length: int,
    *,
    layouts: Sequence[Layout] | None = None,
    prefer_cp: bool = False,
) -> Strategy:
    """:func:`static_layout` replicated over the whole cluster."""
    lay = static_layout(cluster, cost_model, max_length, layouts=layouts, prefer_cp=prefer_cp)
    return Strategy.homogeneous(lay, cluster.num_ranks)
