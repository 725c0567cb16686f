"""Bundled real sequence-length distributions (see ``lengths/README.md`` for provenance).

>>> from balancer.data import bundled_names, read_lengths
>>> lengths = read_lengths("code_kafka")          # int64 tokens per document
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["LENGTHS_DIR", "INSTANCES_FILE", "bundled_names", "bundled_path", "read_lengths"]

LENGTHS_DIR = Path(__file__).resolve().parent / "lengths"
"""Folder of the bundled ``*.parquet`` length files (one int column ``length``)."""
INSTANCES_FILE = Path(__file__).resolve().parent / "instances_hydraulis_13b_64gpu.json"
"""Fixed stage-1 instances with Hydraulis's published 13B cost coefficients (milliseconds)."""


def bundled_names() -> list[str]:
    """Names of the bundled length files, e.g. ``['books_eltec_eng', 'code_kafka', ...]``."""
    return sorted(p.stem for p in LENGTHS_DIR.glob("*.parquet"))


def bundled_path(name: str) -> Path:
    """Path of a bundled length file by name (with or without ``.parquet``)."""
    stem = name.removesuffix(".parquet")
    path = LENGTHS_DIR / f"{stem}.parquet"
    if not path.is_file():
        raise ValueError(f"no bundled length file {name!r}; available: {', '.join(bundled_names())}")
    return path


def read_lengths(source: str | Path, column: str = "length") -> np.ndarray:
    """Token lengths (int64) from a bundled name or a Parquet file with an integer column.

    Raises ``ValueError`` when the file is missing, unreadable, lacks ``column`` or holds
    non-integer or non-positive values (naming the first bad row).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(source)
    if not path.suffix and not path.exists():
        path = bundled_path(str(source))
    if not path.is_file():
        raise ValueError(f"length file {str(path)!r} does not exist; pass a Parquet file or one of {bundled_names()}")
    try:
        table = pq.read_table(path, columns=[column])
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"cannot read {column!r} from {str(path)!r}: {e}") from None
    except KeyError:
        raise ValueError(f"{str(path)!r} has no column {column!r}") from None
    col = table.column(column)
    if not pa.types.is_integer(col.type):
        raise ValueError(f"{str(path)!r}: column {column!r} has type {col.type}, expected integers (tokens)")
    if col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{str(path)!r}: row {first} of {column!r} is null")
    out = col.to_numpy().astype(np.int64, copy=False)
    bad = np.flatnonzero(out <= 0)
    if bad.size:
        raise ValueError(f"{str(path)!r}: row {int(bad[0])} has length {int(out[bad[0]])}; lengths must be >= 1")
    return out
