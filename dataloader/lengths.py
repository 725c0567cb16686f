"""Length sources: how many tokens every sample of a dataset has, as one int64 array.

The sampler plans on lengths alone, so they must be known for the whole dataset before
the first step. Sources, all returning ``int64[n]`` (tokens per sample, index = sample id):

* a Hugging Face ``datasets.Dataset`` column of token lists (``"input_ids"``): the lengths
  come straight from the Arrow list offsets (``pyarrow.compute.list_value_length``), no
  Python loop per row and no row decoded;
* an integer column of that dataset (e.g. a precomputed ``"length"``);
* a numpy array or a sequence of ints;
* a Parquet or Arrow (IPC / Feather) file with an integer or token-list column;
* a callable ``index -> length`` (or, with ``batched=True``, ``int64[k] -> int64[k]``),
  evaluated in chunks with a progress bar for big sets.

Hugging Face datasets carry a fingerprint (``dataset._fingerprint``) that changes with
every transform; lengths computed from a dataset are cached under it as a small ``.npy``
file (8 bytes per sample): next to the dataset's own Arrow cache files when it has
some, else in the user cache directory ``$HYDRAULIS_CACHE_DIR`` (default
``$XDG_CACHE_HOME/hydraulis/lengths`` or ``~/.cache/hydraulis/lengths``). Delete the
files to clear the cache; pass ``cache=False`` to skip it (:mod:`dataloader.length_cache`).

:func:`compute_loss_tokens` counts, per sample, the tokens that carry a loss once the
sample is packed (labels ``!= -100``, the first token never counts), for datasets whose
``labels`` mask prompts; the default is ``length - 1``.

Every check names the row: a zero-length row, a null, a missing column (listing the
columns that exist) or a length array that does not match the dataset size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .length_cache import _cache_load, _cache_store, _dataset_cache_path

__all__ = [
    "IGNORE_INDEX",
    "check_lengths",
    "compute_lengths",
    "compute_loss_tokens",
    "lengths_from_arrow",
    "lengths_from_callable",
    "lengths_from_dataset",
    "lengths_from_file",
]

IGNORE_INDEX = -100
"""Label value that carries no loss (PyTorch's ``cross_entropy`` default ``ignore_index``)."""

_PROGRESS_ABOVE = 100_000
"""Callables over more samples than this show a progress bar by default."""


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------
def check_lengths(
    lengths: np.ndarray | Sequence[int],
    *,
    num_samples: int | None = None,
    what: str = "lengths",
) -> np.ndarray:
    """Validate and return ``lengths`` as a contiguous ``int64[n]`` array of tokens.

    Raises ``ValueError`` naming the first offending row for non-integers, values
    ``< 1`` and a size different from ``num_samples`` (the dataset size).
    """
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D array of token counts, got shape {arr.shape}")
    whole_floats = (
        np.issubdtype(arr.dtype, np.floating) and bool(np.all(np.isfinite(arr))) and bool(np.all(arr == np.round(arr)))
    )
    integers = np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool
    if not (integers or whole_floats or arr.size == 0):
        raise ValueError(f"{what} must hold integers (tokens per sample), got dtype {arr.dtype}")
    if arr.size and (whole_floats or arr.dtype.kind == "u"):  # int64 would wrap these round, not fail
        huge = np.flatnonzero(arr >= 2.0**63 if whole_floats else arr >= 2**63)
        if huge.size:
            i = int(huge[0])
            raise ValueError(f"{what}: row {i} has {arr[i]} tokens, out of range (at most 2**63 - 1); the lengths are corrupt")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if num_samples is not None and arr.size != num_samples:
        raise ValueError(
            f"{what} has {arr.size} entries but the dataset has {num_samples} samples; "
            "the lengths must be computed from this exact dataset (after any filter/select/shuffle)"
        )
    bad = np.flatnonzero(arr < 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{what}: row {i} has {int(arr[i])} tokens ({bad.size} row(s) below 1 token in all); every sample "
            "needs at least 1 token — filter empty rows out first, e.g. "
            "dataset.filter(lambda x: len(x['input_ids']) > 0)"
        )
    return arr


def _first_null_row(column: Any) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


# ---------------------------------------------------------------------------------------
# Arrow columns (shared by datasets and files)
# ---------------------------------------------------------------------------------------
def lengths_from_arrow(table: Any, column: str, *, where: str = "table") -> np.ndarray:
    """Tokens per row of ``column`` in a ``pyarrow.Table``: list lengths or integer values.

    List columns (``list``, ``large_list``, ``fixed_size_list``) are measured from their
    offsets; integer columns are taken as the lengths themselves. Not validated for ``< 1``
    (callers do, naming the dataset row).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if column not in table.column_names:
        raise ValueError(
            f"{where} has no column {column!r}; columns: {', '.join(map(repr, table.column_names))}. "
            "Pass the column that holds the token ids (lengths=...) or an integer length column"
        )
    col = table.column(column)
    kind = col.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        if col.null_count:
            raise ValueError(f"{where}: row {_first_null_row(col)} of column {column!r} is null (no tokens)")
        out = pc.list_value_length(col)
    elif pa.types.is_integer(kind):
        if col.null_count:
            raise ValueError(f"{where}: row {_first_null_row(col)} of column {column!r} is null")
        out = col
    else:
        raise ValueError(
            f"{where}: column {column!r} has type {kind}; expected a list of token ids or an integer "
            "length column. For text, tokenise first (dataset.map(tokenize, batched=True))"
        )
    if isinstance(out, pa.ChunkedArray):
        out = out.combine_chunks() if out.num_chunks != 1 else out.chunk(0)
    return np.asarray(out.to_numpy(zero_copy_only=False), dtype=np.int64)


# ---------------------------------------------------------------------------------------
# Hugging Face datasets
# ---------------------------------------------------------------------------------------
def _arrow_table_and_indices(dataset: Any) -> tuple[Any, np.ndarray | None]:
    data = getattr(dataset, "data", None)
    table = getattr(data, "table", data)
    if table is None or not hasattr(table, "column_names"):
        raise ValueError(
            f"{type(dataset).__name__} is not a Hugging Face datasets.Dataset (no Arrow table); "
            "pass the lengths as an array, a file or a callable instead"
        )
    indices = getattr(dataset, "_indices", None)
    if indices is None:
        return table, None
    idx = indices.column(0)
    idx = idx.combine_chunks() if hasattr(idx, "combine_chunks") else idx
    return table, np.asarray(idx.to_numpy(zero_copy_only=False), dtype=np.int64)


def lengths_from_dataset(dataset: Any, column: str = "input_ids", *, cache: bool = True) -> np.ndarray:
    """Tokens per sample of a Hugging Face ``datasets.Dataset``, vectorised over Arrow.

    ``column`` holds token lists (measured from the list offsets) or integer lengths.
    Respects an indices mapping (after ``select``/``shuffle``/``filter``): entry ``i`` is
    the length of ``dataset[i]``. Cached by ``dataset._fingerprint`` (module docstring).
    """
    num_samples = len(dataset)
    path = _dataset_cache_path(dataset, f"lengths|{column}") if cache else None
    hit = _cache_load(path, num_samples)
    if hit is not None:
        return hit
    table, indices = _arrow_table_and_indices(dataset)
    out = lengths_from_arrow(table, column, where="dataset")
    if indices is not None:
        out = out[indices]
    out = check_lengths(out, num_samples=num_samples, what=f"column {column!r}")
    _cache_store(path, out)
    return out


def compute_loss_tokens(
    dataset: Any,
    labels_column: str = "labels",
    *,
    ignore_index: int = IGNORE_INDEX,
    cache: bool = True,
) -> np.ndarray:
    """Loss-carrying tokens per sample once packed: labels ``!= ignore_index`` after the first token.

    The collator sets the first label of every packed sequence to ``ignore_index``
    (nothing may be predicted across a sequence boundary), so a sample contributes
    ``#{t >= 1 : labels[t] != ignore_index}`` tokens to the loss. Vectorised over the
    Arrow list column; cached like :func:`lengths_from_dataset`.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    num_samples = len(dataset)
    path = _dataset_cache_path(dataset, f"loss|{labels_column}|{ignore_index}") if cache else None
    hit = _cache_load(path, num_samples)
    if hit is not None:
        return hit
    table, indices = _arrow_table_and_indices(dataset)
    if labels_column not in table.column_names:
        raise ValueError(
            f"dataset has no column {labels_column!r}; columns: {', '.join(map(repr, table.column_names))}"
        )
    col = table.column(labels_column)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise ValueError(f"dataset column {labels_column!r} has type {col.type}; expected a list of label ids")
    if col.null_count:
        raise ValueError(f"dataset: row {_first_null_row(col)} of column {labels_column!r} is null")
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.offset:  # a sliced array: rebase so offsets index into .values from 0
        arr = pa.concat_arrays([arr])
    offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    values = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    offsets = offsets - offsets[0]
    carries = np.asarray(pc.not_equal(values, ignore_index).to_numpy(zero_copy_only=False), dtype=np.int64)
    prefix = np.concatenate([[0], np.cumsum(carries)])
    lens = np.diff(offsets)
    # Σ over tokens 1..len-1 of the row: prefix[end] - prefix[start + 1] (rows of length 0 give 0).
    starts = offsets[:-1]
    out = np.where(lens > 0, prefix[offsets[1:]] - prefix[np.minimum(starts + 1, offsets[1:])], 0)
    out = out.astype(np.int64)
    if indices is not None:
        out = out[indices]
    _cache_store(path, out)
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------------------
# files and callables
# ---------------------------------------------------------------------------------------
def lengths_from_file(path: str | Path, column: str = "length") -> np.ndarray:
    """Tokens per row from a Parquet (``.parquet``) or Arrow IPC/Feather (``.arrow``, ``.feather``) file.

    ``column`` may be an integer length column or a token-list column.
    """
    import pyarrow as pa

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"length file {str(p)!r} does not exist")
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(p)
            if column not in schema.names:
                raise ValueError(f"{str(p)!r} has no column {column!r}; columns: {', '.join(map(repr, schema.names))}")
            table = pq.read_table(p, columns=[column])
        else:
            table = _read_arrow_file(p)
    except pa.ArrowInvalid as e:
        raise ValueError(f"cannot read {str(p)!r} as Parquet or Arrow: {e}") from None
    return check_lengths(lengths_from_arrow(table, column, where=repr(str(p))), what=f"{str(p)!r} column {column!r}")


def _read_arrow_file(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as source:
        try:
            return ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            # The streaming IPC format (what datasets writes for its .arrow cache files).
            return ipc.open_stream(source).read_all()


def lengths_from_callable(
    fn: Callable[[Any], Any],
    num_samples: int,
    *,
    batched: bool = False,
    chunk_size: int = 65_536,
    progress: bool | None = None,
) -> np.ndarray:
    """Evaluate ``fn`` over indices ``0..num_samples-1`` in chunks of ``chunk_size``.

    ``batched=False``: ``fn(i) -> int``. ``batched=True``: ``fn(int64[k]) -> int[k]`` (one
    call per chunk, the fast path). ``progress`` (default: more than 100,000 samples)
    shows a ``tqdm`` bar over samples.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples={num_samples} must be >= 0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    show = num_samples > _PROGRESS_ABOVE if progress is None else progress
    out = np.empty(num_samples, dtype=np.int64)
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_samples, unit="sample", desc="lengths")
    try:
        for lo in range(0, num_samples, chunk_size):
            hi = min(num_samples, lo + chunk_size)
            if batched:
                got = np.asarray(fn(np.arange(lo, hi, dtype=np.int64)))
                if got.shape != (hi - lo,):
                    raise ValueError(
                        f"batched length function returned shape {got.shape} for indices {lo}..{hi - 1}; "
                        f"expected ({hi - lo},)"
                    )
                out[lo:hi] = got
            else:
                out[lo:hi] = np.fromiter((fn(i) for i in range(lo, hi)), dtype=np.int64, count=hi - lo)
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
    return check_lengths(out, num_samples=num_samples, what="length function")


# ---------------------------------------------------------------------------------------
# one entry point
# ---------------------------------------------------------------------------------------
def _is_hf_dataset(obj: Any) -> bool:
    return hasattr(obj, "_fingerprint") and hasattr(obj, "data") and hasattr(obj, "column_names")


def compute_lengths(
    source: Any = None,
    *,
    dataset: Any = None,
    column: str | None = None,
    batched: bool = False,
    cache: bool = True,
    cache_key: str | None = None,
    progress: bool | None = None,
) -> np.ndarray:
    """Resolve any length source to a validated ``int64[n]`` array (tokens per sample).

    ``source`` may be:

    * ``None`` or a column name (``str`` without a file suffix) with a Hugging Face
      ``dataset``: that column (default ``"input_ids"``);
    * a numpy array / sequence of ints;
    * a path to a ``.parquet`` / ``.arrow`` / ``.feather`` file (``column``, default ``"length"``);
    * a callable over indices (``batched`` as in :func:`lengths_from_callable`; needs a
      ``dataset`` with ``len``). A callable's result is cached only under an explicit
      ``cache_key`` (with the dataset fingerprint): the library cannot tell when a
      function's behaviour changed, so name the version yourself (``"tok-v2"``).

    When ``dataset`` is given, the result must have exactly ``len(dataset)`` entries.
    """
    num_samples = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    if source is None or (isinstance(source, str) and Path(source).suffix not in (".parquet", ".arrow", ".feather")):
        col = source if isinstance(source, str) else (column or "input_ids")
        what = f"lengths={source!r} names a column" if source is not None else f"no lengths were given (default: column {col!r})"
        if dataset is None:
            raise ValueError(f"{what}, but no dataset was given; pass dataset=... or an array of lengths")
        if not _is_hf_dataset(dataset):
            raise ValueError(
                f"{what}, but {type(dataset).__name__} is not a Hugging Face datasets.Dataset; pass the lengths "
                "as an array, a Parquet/Arrow file or a callable (index -> tokens)"
            )
        return lengths_from_dataset(dataset, col, cache=cache)
    if isinstance(source, (str, Path)):
        out = lengths_from_file(source, column or "length")
        return check_lengths(out, num_samples=num_samples, what=f"length file {str(source)!r}")
    if callable(source) and not isinstance(source, np.ndarray):
        if num_samples is None:
            raise ValueError("a length function needs dataset=... (with len()) to know how many samples to measure")
        path = _dataset_cache_path(dataset, f"callable|{cache_key}") if cache and cache_key else None
        hit = _cache_load(path, num_samples)
        if hit is not None:
            return hit
        out = lengths_from_callable(source, num_samples, batched=batched, progress=progress)
        _cache_store(path, out)
        return out
    return check_lengths(source, num_samples=num_samples)
