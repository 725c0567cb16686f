"""scan_dataset: lengths (and loss tokens) of a plain map-style dataset, read once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataloader.scan import scan_dataset


def test_dict_samples_and_raw_token_lists() -> None:
    dicts = [{"input_ids": torch.arange(n)} for n in (3, 7, 1)]
    got = scan_dataset(dicts)
    assert got.lengths.tolist() == [3, 7, 1] and got.loss_tokens is None
    assert scan_dataset([[1, 2], np.arange(5)]).lengths.tolist() == [2, 5]
    assert scan_dataset([{"ids": [1, 2, 3]}], input_key="ids").lengths.tolist() == [3]


def test_labels_give_the_loss_tokens_the_collator_counts() -> None:
    # the first token never carries a loss in a packed row; -100 labels carry none
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [1, 2], "labels": [1, 2]}]
    assert scan_dataset(rows).loss_tokens.tolist() == [2, 1]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"input_ids": [1]}, {"text": "x"}], r"sample 1 has no field 'input_ids' \(fields: \['text'\]\)"),
        ([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3]}], "sample 1 has no 'labels' unlike sample 0"),
        ([{"input_ids": []}], "row 0 has 0 tokens"),
    ],
    ids=["missing-field", "labels-on-some", "empty"],
)
def test_bad_samples_are_named(rows: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        scan_dataset(rows)


def test_an_unsized_dataset_asks_for_lengths() -> None:
    with pytest.raises(ValueError, match="pass lengths="):
        scan_dataset(iter([[1, 2]]))
