"""dataloader.sources: lengths from Parquet / JSONL / Arrow / save_to_disk, column detection, tokenising."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from dataloader.sources import column_kinds, detect_column, read_dataset_lengths

RNG = np.random.default_rng(0)
LENGTHS = RNG.integers(1, 60, size=300)
WORDS = ["alpha", "beta", "gamma", "delta", "eps"]
TEXTS = [" ".join(RNG.choice(WORDS, size=n)) for n in LENGTHS]


def _word_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json trained locally (no download): one token per word, no specials added."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(path))
    return path


def _tokens_table() -> pa.Table:
    ids = [list(range(n)) for n in LENGTHS]
    return pa.table({"id": np.arange(LENGTHS.size), "input_ids": ids, "labels": ids, "text": TEXTS})


def test_token_list_column_is_preferred_and_measured(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(_tokens_table(), path, row_group_size=50)
    src = read_dataset_lengths(path, progress=False)
    assert src.column == "input_ids" and src.kind == "tokens" and src.format == "parquet"
    np.testing.assert_array_equal(src.lengths, LENGTHS)


def test_integer_length_column_in_arrow_and_feather(tmp_path: Path) -> None:
    table = pa.table({"doc_id": np.arange(LENGTHS.size), "num_tokens": LENGTHS})
    arrow = tmp_path / "d.arrow"
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:  # the stream format
        w.write_table(table)
    feather.write_feather(table, tmp_path / "d.feather")
    for path in (arrow, tmp_path / "d.feather"):
        src = read_dataset_lengths(path, progress=False)
        assert (src.column, src.kind) == ("num_tokens", "lengths")
        np.testing.assert_array_equal(src.lengths, LENGTHS)


def test_text_column_counts_tokens_with_a_local_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    pa_table = pa.table({"text": TEXTS, "source": ["web"] * len(TEXTS)})
    path.write_text("\n".join(json.dumps(r) for r in pa_table.to_pylist()) + "\n")
    tok = _word_tokenizer(tmp_path / "tokenizer.json")
    src = read_dataset_lengths(path, tokenizer=tok, progress=False)
    assert (src.column, src.kind, src.format) == ("text", "text", "jsonl")
    np.testing.assert_array_equal(src.lengths, LENGTHS)
    with pytest.raises(ValueError, match="holds text; pass --tokenizer tokenizer.json"):
        read_dataset_lengths(path, progress=False)


def test_empty_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2], [], [3], []]}), path)
    src = read_dataset_lengths(path, progress=False)
    assert src.lengths.tolist() == [2, 1] and src.skipped_empty == 2 and src.num_rows == 4


def test_save_to_disk_folder_and_splits(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [list(range(n)) for n in LENGTHS[:50]]})
    ds.save_to_disk(str(tmp_path / "one"))
    assert read_dataset_lengths(tmp_path / "one", progress=False).lengths.tolist() == LENGTHS[:50].tolist()
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
    assert read_dataset_lengths(tmp_path / "dict", progress=False).num_rows == 50  # train by default
    assert read_dataset_lengths(tmp_path / "dict", split="test", progress=False).num_rows == 5
    with pytest.raises(ValueError, match="has no split 'dev'; splits: train, test"):
        read_dataset_lengths(tmp_path / "dict", split="dev", progress=False)


def test_ambiguous_and_bad_columns_list_the_columns(tmp_path: Path) -> None:
    schema = pa.schema([("a", pa.list_(pa.int32())), ("b", pa.list_(pa.int64())), ("c", pa.float64())])
    with pytest.raises(ValueError, match=r"a, b all could; pass --column NAME. Columns: a \(list<item: int32>\)"):
        detect_column(schema, "'x'")
    assert detect_column(schema, "'x'", column="b") == ("b", "tokens")
    with pytest.raises(ValueError, match="has no column 'z'; columns: a"):
        detect_column(schema, "'x'", column="z")
    with pytest.raises(ValueError, match="column 'c' has type double"):
        detect_column(schema, "'x'", column="c")
    ints = pa.schema([("id", pa.int64()), ("label", pa.int64())])
    with pytest.raises(ValueError, match="no column of token ids, lengths or text"):
        detect_column(ints, "'x'")
    assert column_kinds(ints) == {"id": "lengths", "label": "lengths"}


def test_bad_files_raise_value_errors(tmp_path: Path) -> None:
    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="cannot read .*bad.parquet.* as parquet"):
        read_dataset_lengths(corrupt, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        read_dataset_lengths(tmp_path / "missing.parquet", progress=False)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data format '.csv'"):
        read_dataset_lengths(tmp_path / "d.csv", progress=False)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        read_dataset_lengths(tmp_path / "folder", progress=False)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"input_ids": [[1], [2, 3]] * 3000 + [None]}), nulls)
    with pytest.raises(ValueError, match="row 6000 of column 'input_ids' is null"):
        read_dataset_lengths(nulls, progress=False)
