"""Length sources: Hugging Face columns via Arrow offsets, files, arrays, callables, cache, errors."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from dataloader.length_cache import cache_dir
from dataloader.lengths import (
    check_lengths,
    compute_lengths,
    compute_loss_tokens,
    lengths_from_callable,
    lengths_from_dataset,
    lengths_from_file,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("HYDRAULIS_CACHE_DIR", str(folder))
    return folder


def _token_dataset(lengths: list[int]) -> datasets.Dataset:
    rows = [list(range(1, n + 1)) for n in lengths]
    return datasets.Dataset.from_dict({"input_ids": rows, "n": lengths, "text": [str(n) for n in lengths]})


def test_list_column_uses_arrow_offsets_without_decoding_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _token_dataset([3, 1, 7, 2])

    def no_rows(*args: object, **kwargs: object) -> None:
        raise AssertionError("a row was decoded")

    monkeypatch.setattr(datasets.Dataset, "__getitem__", no_rows)
    monkeypatch.setattr(datasets.Dataset, "__getitems__", no_rows)
    out = lengths_from_dataset(ds, "input_ids", cache=False)
    assert out.dtype == np.int64
    assert out.tolist() == [3, 1, 7, 2]


def test_indices_mapping_after_select_and_shuffle() -> None:
    ds = _token_dataset([3, 1, 7, 2, 5])
    sel = ds.select([4, 0, 2])
    assert compute_lengths(dataset=sel).tolist() == [5, 3, 7]
    shuf = ds.shuffle(seed=3)
    want = [len(r["input_ids"]) for r in shuf]
    assert compute_lengths(dataset=shuf).tolist() == want


def test_integer_column_and_array_sources() -> None:
    ds = _token_dataset([3, 1, 7])
    assert compute_lengths("n", dataset=ds).tolist() == [3, 1, 7]
    assert compute_lengths(np.array([4, 5]), dataset=None).tolist() == [4, 5]
    assert compute_lengths([2.0, 3.0]).tolist() == [2, 3]


def test_missing_column_names_it_and_lists_the_columns() -> None:
    ds = _token_dataset([3, 1])
    with pytest.raises(ValueError, match=r"no column 'tokens'.*'input_ids'"):
        compute_lengths("tokens", dataset=ds)
    with pytest.raises(ValueError, match="type string"):
        compute_lengths("text", dataset=ds)


def test_zero_length_row_is_named() -> None:
    ds = _token_dataset([3, 0, 2, 0])
    with pytest.raises(ValueError, match=r"row 1 has 0 tokens \(2 row\(s\)"):
        compute_lengths(dataset=ds)


def test_null_row_is_named() -> None:
    table = pa.table({"input_ids": pa.array([[1, 2], None, [3]], type=pa.list_(pa.int32()))})
    ds = datasets.Dataset(table)
    with pytest.raises(ValueError, match="row 1 of column 'input_ids' is null"):
        compute_lengths(dataset=ds)


def test_size_mismatch_with_the_dataset() -> None:
    ds = _token_dataset([3, 1, 2])
    with pytest.raises(ValueError, match="has 2 entries but the dataset has 3 samples"):
        compute_lengths(np.array([1, 2]), dataset=ds)


def test_parquet_and_arrow_files(tmp_path: Path) -> None:
    pq.write_table(pa.table({"length": pa.array([5, 6, 7], type=pa.int32())}), tmp_path / "a.parquet")
    assert lengths_from_file(tmp_path / "a.parquet").tolist() == [5, 6, 7]
    lists = pa.table({"input_ids": pa.array([[1], [1, 2, 3]], type=pa.list_(pa.int64()))})
    feather.write_feather(lists, tmp_path / "b.arrow")
    assert compute_lengths(str(tmp_path / "b.arrow"), column="input_ids").tolist() == [1, 3]
    with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as sink:  # streaming IPC, like datasets' cache files
        with pa.ipc.new_stream(sink, lists.schema) as writer:
            writer.write_table(lists)
    assert lengths_from_file(tmp_path / "c.arrow", "input_ids").tolist() == [1, 3]
    with pytest.raises(ValueError, match="has no column 'len'"):
        lengths_from_file(tmp_path / "a.parquet", "len")
    with pytest.raises(ValueError, match="does not exist"):
        lengths_from_file(tmp_path / "missing.parquet")


def test_bundled_length_file_reads() -> None:
    from balancer.data import bundled_path

    out = lengths_from_file(bundled_path("code_kafka"))
    assert out.size > 100 and out.min() >= 1


def test_callable_scalar_and_batched_agree() -> None:
    def one(i: int) -> int:
        return i % 5 + 1

    def many(idx: np.ndarray) -> np.ndarray:
        return idx % 5 + 1

    a = lengths_from_callable(one, 1000, chunk_size=64)
    b = lengths_from_callable(many, 1000, batched=True, chunk_size=64, progress=True)
    assert a.tolist() == b.tolist() == [i % 5 + 1 for i in range(1000)]
    with pytest.raises(ValueError, match="row 0 has 0 tokens"):
        lengths_from_callable(lambda i: i, 3)
    with pytest.raises(ValueError, match="returned shape"):
        lengths_from_callable(lambda idx: idx[:1], 3, batched=True)


def test_cache_by_fingerprint_is_written_and_reused(_private_cache: Path) -> None:
    ds = _token_dataset([4, 2, 9])
    first = compute_lengths(dataset=ds)
    files = list(_private_cache.glob("hydraulis-lengths-*.npy"))
    assert len(files) == 1
    np.save(files[0], np.array([1, 1, 1], dtype=np.int64))  # the cache, not the table, now answers
    assert compute_lengths(dataset=ds).tolist() == [1, 1, 1]
    assert compute_lengths(dataset=ds, cache=False).tolist() == first.tolist()
    other = ds.select([2, 0])  # new fingerprint → new entry
    assert compute_lengths(dataset=other).tolist() == [9, 4]


def test_cache_sits_next_to_dataset_cache_files(tmp_path: Path) -> None:
    _token_dataset([4, 2]).save_to_disk(str(tmp_path / "ds"))
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    assert ds.cache_files
    compute_lengths(dataset=ds)
    assert list((tmp_path / "ds").glob("hydraulis-lengths-*.npy"))


def test_callable_is_cached_only_under_an_explicit_key(_private_cache: Path) -> None:
    ds = _token_dataset([4, 2])
    calls = []

    def fn(i: int) -> int:
        calls.append(i)
        return 3

    compute_lengths(fn, dataset=ds)
    compute_lengths(fn, dataset=ds)
    assert len(calls) == 4
    compute_lengths(fn, dataset=ds, cache_key="v1")
    compute_lengths(fn, dataset=ds, cache_key="v1")
    assert len(calls) == 6


def test_cache_dir_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYDRAULIS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert cache_dir() == Path("/x/hydraulis/lengths")


def test_loss_tokens_count_labels_after_the_first_token() -> None:
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3, 4], [5], [6, 7, 8]],
            "labels": [[-100, -100, 3, 4], [5], [6, -100, 8]],
        }
    )
    assert compute_loss_tokens(ds).tolist() == [2, 0, 1]
    assert compute_loss_tokens(ds.select([2, 0])).tolist() == [1, 2]
    with pytest.raises(ValueError, match="no column 'target'"):
        compute_loss_tokens(ds, "target")


def test_check_lengths_rejects_bad_shapes_and_types() -> None:
    with pytest.raises(ValueError, match="1-D"):
        check_lengths(np.ones((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        check_lengths(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="row 2 has -1 tokens"):
        check_lengths([3, 4, -1])


def test_lengths_out_of_the_int64_range_are_refused() -> None:
    """A whole-number float such as 1e30 must not wrap round to a negative token count."""
    with pytest.raises(ValueError, match=r"row 1 has 1e\+30 tokens, out of range"):
        check_lengths(np.array([3.0, 1e30]))
    with pytest.raises(ValueError, match="row 0 has 18446744073709551615 tokens, out of range"):
        check_lengths(np.array([2**64 - 1], dtype=np.uint64))
    assert check_lengths(np.array([3.0, 2.0**40])).tolist() == [3, 2**40]
