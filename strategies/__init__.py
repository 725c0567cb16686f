"""Parallel layouts, strategies, candidate pools, the cluster spec.

The torch runtime lives in ``strategies.runtime`` and is not imported here, so
``import strategies`` stays free of torch.
"""

from .candidates import (
    CandidateConfig,
    CandidatePool,
    LengthHistogram,
    enumerate_layouts,
    generate_candidates,
    heterogeneous_mixes,
    load_candidates,
    save_candidates,
)
from .layout import GIB, ClusterSpec, Layout, Replica, Strategy

__all__ = [
    "GIB",
    "CandidateConfig",
    "CandidatePool",
    "ClusterSpec",
    "Layout",
    "LengthHistogram",
    "Replica",
    "Strategy",
    "enumerate_layouts",
    "generate_candidates",
    "heterogeneous_mixes",
    "load_candidates",
    "save_candidates",
]
