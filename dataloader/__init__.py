"""Balanced, resumable data loading: length sources, the distributed sampler, collators."""

__all__: list[str] = []
