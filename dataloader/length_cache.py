"""The lengths cache: computed length arrays kept on disk under a dataset's fingerprint.

Hugging Face datasets carry a fingerprint (``dataset._fingerprint``) that changes with
every transform. :mod:`dataloader.lengths` keys what it computes from a dataset (lengths
of a column, loss tokens, a callable's results under an explicit key) by that fingerprint
and stores it as a small ``.npy`` file (8 bytes per sample): next to the dataset's own
Arrow cache files when it has some, else in :func:`cache_dir`. Writes are atomic (a
temporary file, then a rename), so concurrent ranks never read a half-written file; an
unreadable or mismatched file counts as a miss, and a read-only location only costs a
recomputation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cache_dir"]

_CACHE_VERSION = 1


def cache_dir() -> Path:
    """User cache directory for length files (see the module docstring)."""
    env = os.environ.get("HYDRAULIS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hydraulis" / "lengths"


def _dataset_cache_path(dataset: Any, key: str) -> Path | None:
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not fingerprint:
        return None
    name = hashlib.sha256(f"v{_CACHE_VERSION}|{fingerprint}|{key}".encode()).hexdigest()[:24]
    files = getattr(dataset, "cache_files", None) or []
    folder = Path(files[0]["filename"]).parent if files else cache_dir()
    return folder / f"hydraulis-lengths-{name}.npy"


def _cache_load(path: Path | None, num_samples: int) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.ndim != 1 or arr.size != num_samples or arr.dtype != np.int64:
        return None
    return arr


def _cache_store(path: Path | None, arr: np.ndarray) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, arr, allow_pickle=False)
        os.replace(tmp, path)  # atomic: concurrent ranks never read a half-written file
    except OSError:
        # A read-only cache location only costs a recomputation next time.
        return
