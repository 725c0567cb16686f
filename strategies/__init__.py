"""Parallel layouts, strategies, the cluster spec, and (in ``strategies.runtime``) the torch runtime."""

from .layout import GIB, ClusterSpec, Layout, Replica, Strategy

__all__ = ["GIB", "ClusterSpec", "Layout", "Replica", "Strategy"]
