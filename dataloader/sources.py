"""Token lengths of a dataset on disk, for ``hydraulis profile``.

Reads Parquet (``.parquet``), JSON lines (``.jsonl``, ``.ndjson``, ``.json``), Arrow IPC /
Feather (``.arrow``, ``.feather``, ``.ipc``) and folders written by
``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``, with a split). The
sequence column may hold

* **token ids** (a list column such as ``input_ids``): lengths come from the Arrow list
  offsets (:func:`dataloader.lengths.lengths_from_arrow`), no row decoded;
* **lengths** (an integer column such as ``length`` or ``num_tokens``): taken as is;
* **text** (a string column): encoded with a local Hugging Face ``tokenizers`` file
  (``tokenizer.json``) in batches (``encode_batch_fast``, multi-threaded in Rust).

Without ``column`` the column is detected from the types and names; when that is
ambiguous the error lists every column with its type. Empty rows (0 tokens) are skipped
and counted: a profile describes the sequences a loader would train on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["DATA_SUFFIXES", "LengthSource", "column_kinds", "detect_column", "read_dataset_lengths"]

DATA_SUFFIXES = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
}
"""File suffix → format."""
TOKEN_NAMES = ("input_ids", "tokens", "token_ids", "ids")
LENGTH_NAME = re.compile(r"(^|_)(len|length|lengths|seq_?len|num_tokens|n_tokens|token_count|ntokens)$")
TEXT_NAMES = ("text", "content", "document", "body")
_BATCH_ROWS = 4096
"""Rows per read/encode batch: large enough to keep the Rust tokenizer's threads busy."""


@dataclass(frozen=True)
class LengthSource:
    """Lengths read from one dataset, and where they came from."""

    lengths: np.ndarray
    """int64 tokens per kept row (empty rows removed)."""
    path: str
    format: str
    """``parquet``, ``jsonl``, ``arrow`` or ``datasets``."""
    column: str
    kind: str
    """``tokens`` (list column), ``lengths`` (integer column) or ``text`` (tokenised)."""
    num_rows: int
    """Rows in the dataset, empty ones included."""
    skipped_empty: int = 0
    """Rows with 0 tokens, left out of :attr:`lengths`."""
    tokenizer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance for the profile's ``meta``."""
        out = {"path": self.path, "format": self.format, "column": self.column, "kind": self.kind,
               "num_rows": self.num_rows, "skipped_empty": self.skipped_empty}
        if self.tokenizer:
            out["tokenizer"] = self.tokenizer
        return {**out, **self.meta}


# -- column detection ------------------------------------------------------------------------------


def column_kinds(schema: Any) -> dict[str, str]:
    """``{name: kind}`` for every column of a ``pyarrow.Schema``: ``tokens``, ``lengths``,
    ``text`` or ``other``."""
    import pyarrow as pa

    out = {}
    for f in schema:
        t = f.type
        if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and pa.types.is_integer(
            t.value_type
        ):
            out[f.name] = "tokens"
        elif pa.types.is_integer(t):
            out[f.name] = "lengths"
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            out[f.name] = "text"
        else:
            out[f.name] = "other"
    return out


def _listing(schema: Any) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


TEXT_HINT = "pass --tokenizer tokenizer.json (a Hugging Face tokenizers file) to count its tokens"
"""What an error about an untokenised text column tells the user to do."""


def detect_column(
    schema: Any, where: str, column: str | None = None, have_tokenizer: bool = False, text_hint: str = TEXT_HINT
) -> tuple[str, str]:
    """``(column, kind)`` of the sequences: the given column, or the one detected.

    Preference: a token-id list column (``input_ids`` first), then an integer column whose
    name says length (``length``, ``num_tokens``, ``seq_len``...), then a text column
    (``text`` first; only with a tokenizer). Raises ``ValueError`` listing the columns when
    there is no candidate or more than one equally good.
    """
    kinds = column_kinds(schema)
    if column is not None:
        if column not in kinds:
            raise ValueError(f"{where} has no column {column!r}; columns: {_listing(schema)}")
        kind = kinds[column]
        if kind == "other":
            raise ValueError(
                f"{where}: column {column!r} has type {schema.field(column).type}; give a list of token ids, "
                "an integer length or a text column"
            )
        return column, kind
    fix = "pass --column NAME"
    tokens = [n for n, k in kinds.items() if k == "tokens"]
    if tokens:
        named = [n for n in TOKEN_NAMES if n in tokens]
        if len(tokens) == 1 or named:
            return (named[0] if named else tokens[0]), "tokens"
        raise ValueError(
            f"cannot tell which column of {where} holds the token ids: {', '.join(tokens)} all could; {fix}. "
            f"Columns: {_listing(schema)}"
        )
    lengths = [n for n, k in kinds.items() if k == "lengths" and LENGTH_NAME.search(n.lower())]
    if len(lengths) == 1:
        return lengths[0], "lengths"
    if len(lengths) > 1:
        raise ValueError(
            f"cannot tell which column of {where} holds the lengths: {', '.join(lengths)} all could; {fix}. "
            f"Columns: {_listing(schema)}"
        )
    texts = [n for n, k in kinds.items() if k == "text"]
    named = [n for n in TEXT_NAMES if n in texts]
    if len(texts) == 1 or named:
        col = named[0] if named else texts[0]
        if not have_tokenizer:
            raise ValueError(f"{where}: column {col!r} holds text; {text_hint}, or give a token-id or length column")
        return col, "text"
    if len(texts) > 1:
        raise ValueError(
            f"cannot tell which text column of {where} to tokenise: {', '.join(texts)}; {fix}. "
            f"Columns: {_listing(schema)}"
        )
    raise ValueError(
        f"{where} has no column of token ids, lengths or text; columns: {_listing(schema) or '(none)'}; {fix}"
    )


# -- batch readers ----------------------------------------------------------------------------------


@dataclass
class _Table:
    """A dataset opened for reading: its schema, row count and a batch iterator per column."""

    schema: Any
    num_rows: int
    batches: Callable[[str], Iterator[Any]]
    """``batches(column)`` yields ``pyarrow`` tables or record batches holding that column."""
    format: str


def _open_parquet(p: Path) -> _Table:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(p)
    return _Table(
        schema=f.schema_arrow,
        num_rows=f.metadata.num_rows,
        batches=lambda col: f.iter_batches(batch_size=_BATCH_ROWS, columns=[col]),
        format="parquet",
    )


def _open_in_memory(table: Any, fmt: str) -> _Table:
    return _Table(
        schema=table.schema,
        num_rows=table.num_rows,
        batches=lambda col: iter(table.select([col]).to_batches(max_chunksize=_BATCH_ROWS)),
        format=fmt,
    )


def _open_jsonl(p: Path) -> _Table:
    import pyarrow.json as pj

    return _open_in_memory(pj.read_json(p), "jsonl")


def _open_arrow(p: Path) -> _Table:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(p)) as src:
        try:
            table = ipc.open_file(src).read_all()
        except pa.ArrowInvalid:
            src.seek(0)
            table = ipc.open_stream(src).read_all()  # the stream format (datasets' cache files)
    return _open_in_memory(table, "arrow")


def _open_datasets(p: Path, split: str | None) -> tuple[_Table, str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - datasets raises several types for a bad folder
        msg = " ".join(str(e).split())
        raise ValueError(f"cannot load {str(p)!r} with datasets.load_from_disk: {msg}") from None
    where = str(p)
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if split is None:
            if "train" not in ds:
                raise ValueError(f"{where} holds the splits {', '.join(splits)}; choose one with --split NAME")
            split = "train"
        if split not in ds:
            raise ValueError(f"{where} has no split {split!r}; splits: {', '.join(splits)}")
        ds = ds[split]
        where = f"{where} [{split}]"
    elif split is not None:
        raise ValueError(f"{where} is a single dataset without splits; leave out --split {split}")
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"{where} is a {type(ds).__name__}; profile needs a map-style datasets.Dataset")
    arrow = ds.with_format("arrow")
    return (
        _Table(
            schema=ds.data.schema,
            num_rows=len(ds),
            batches=lambda col: arrow.select_columns([col]).iter(batch_size=_BATCH_ROWS),
            format="datasets",
        ),
        where,
    )


def _open(path: str | Path, split: str | None) -> tuple[_Table, str]:
    import pyarrow as pa

    p = Path(path)
    if not p.exists():
        raise ValueError(f"data {str(p)!r} does not exist; give a Parquet, JSONL or Arrow file or a save_to_disk folder")
    if p.is_dir():
        if not any((p / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise ValueError(
                f"{str(p)!r} is a folder but not one written by datasets' save_to_disk (no dataset_info.json, "
                "state.json or dataset_dict.json); give a data file instead"
            )
        return _open_datasets(p, split)
    fmt = DATA_SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{str(p)!r}: unknown data format {p.suffix or '(no suffix)'!r}; use Parquet (.parquet), JSON lines "
            "(.jsonl), Arrow (.arrow, .feather) or a datasets save_to_disk folder"
        )
    if split is not None:
        raise ValueError(f"--split applies to save_to_disk folders only; {str(p)!r} is a {fmt} file")
    opener = {"parquet": _open_parquet, "jsonl": _open_jsonl, "arrow": _open_arrow}[fmt]
    try:
        return opener(p), str(p)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"cannot read {str(p)!r} as {fmt}: {msg}") from None


# -- lengths ---------------------------------------------------------------------------------------


def _load_tokenizer(path: str | Path) -> Any:
    from tokenizers import Tokenizer

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"tokenizer file {str(p)!r} does not exist; give a Hugging Face tokenizer.json")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a plain Exception on a bad file
        msg = " ".join(str(e).split())
        raise ValueError(f"cannot load tokenizer {str(p)!r}: {msg}") from None


def _text_lengths(
    batches: Iterator[Any], column: str, tokenizer: Any, where: str, add_special_tokens: bool, bar: Any
) -> np.ndarray:
    out: list[np.ndarray] = []
    row = 0
    for batch in batches:
        col = batch.column(column) if hasattr(batch, "column") else batch[column]
        if col.null_count:
            nulls = np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))
            raise ValueError(f"{where}: row {row + int(nulls[0])} of column {column!r} is null (no text)")
        texts = col.to_pylist()
        enc = tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        out.append(np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(enc)))
        row += len(texts)
        bar.update(len(texts))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _column_lengths(batches: Iterator[Any], column: str, where: str, bar: Any) -> np.ndarray:
    import pyarrow as pa

    from dataloader.lengths import lengths_from_arrow

    out: list[np.ndarray] = []
    row = 0
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        try:
            got = lengths_from_arrow(table, column, where=where)
        except ValueError as e:  # name the dataset row, not the row inside this batch
            m = re.search(r"row (\d+)", str(e))
            if m:
                raise ValueError(str(e).replace(m.group(0), f"row {row + int(m.group(1))}", 1)) from None
            raise
        out.append(got)
        row += table.num_rows
        bar.update(table.num_rows)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def read_dataset_lengths(
    path: str | Path,
    *,
    column: str | None = None,
    tokenizer: str | Path | None = None,
    split: str | None = None,
    add_special_tokens: bool = True,
    progress: bool | None = None,
    text_hint: str = TEXT_HINT,
) -> LengthSource:
    """Tokens per row of a dataset on disk (see the module docstring for formats and columns).

    ``tokenizer``: a ``tokenizer.json`` for a text column. ``add_special_tokens``: count the
    tokens the tokenizer's post-processor adds (BOS/EOS), as ``tokenizer.encode`` does by
    default. ``progress=None`` shows a tqdm bar when stderr is a terminal. ``text_hint``
    ends the error for a text column without a tokenizer. Raises
    ``ValueError`` naming the file, the column or the row.
    """
    import sys

    from tqdm.auto import tqdm

    table, where = _open(path, split)
    col, kind = detect_column(table.schema, repr(where), column, have_tokenizer=tokenizer is not None,
                              text_hint=text_hint)
    if kind == "text" and tokenizer is None:
        raise ValueError(f"{where}: column {col!r} holds text; {text_hint}")
    if kind != "text" and tokenizer is not None:
        raise ValueError(f"{where}: column {col!r} holds {kind}, not text; leave out --tokenizer or pick a text column")
    tok = _load_tokenizer(tokenizer) if tokenizer is not None else None
    show = sys.stderr.isatty() if progress is None else progress
    desc = "tokenise" if kind == "text" else "read"
    with tqdm(total=table.num_rows, desc=desc, unit="row", disable=not show) as bar:
        if kind == "text":
            lengths = _text_lengths(table.batches(col), col, tok, where, add_special_tokens, bar)
        else:
            lengths = _column_lengths(table.batches(col), col, where, bar)
    if lengths.size and lengths.min() < 0:
        i = int(np.argmin(lengths))
        raise ValueError(f"{where}: row {i} of column {col!r} has length {int(lengths[i])}; lengths must be >= 0")
    kept = lengths[lengths > 0]
    skipped = int(lengths.size - kept.size)
    if kept.size == 0:
        raise ValueError(f"{where}: column {col!r} has no row with at least one token ({lengths.size} rows)")
    return LengthSource(
        lengths=np.ascontiguousarray(kept, dtype=np.int64),
        path=where,
        format=table.format,
        column=col,
        kind=kind,
        num_rows=int(lengths.size),
        skipped_empty=skipped,
        tokenizer=str(tokenizer) if tokenizer is not None else None,
        meta={"add_special_tokens": add_special_tokens} if kind == "text" else {},
    )
