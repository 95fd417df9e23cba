"""Dynamic padding for both tasks, and the packed causal LM batch."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from ranktune.data import build_collator


def test_causal_lm_padding_values(tokenizer: PreTrainedTokenizerFast) -> None:
    pad = tokenizer.pad_token_id
    collate = build_collator(tokenizer, "causal_lm")

    batch = collate([{"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}, {"input_ids": [21], "labels": [21]}])

    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[11, 12, 13], [21, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 12, 13], [21, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_packed_batch_has_no_attention_mask_and_padding_is_its_own_segment(tokenizer: PreTrainedTokenizerFast) -> None:
    pad = tokenizer.pad_token_id
    collate = build_collator(tokenizer, "causal_lm", packing=True)
    rows = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [7, 8], "labels": [-100, 8], "position_ids": [0, 1]},
    ]

    batch = collate(rows)

    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, pad, pad, pad]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 8, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]


@pytest.mark.parametrize("packing", [True, False])
def test_rows_and_collator_must_agree_on_packing(tokenizer: PreTrainedTokenizerFast, packing: bool) -> None:
    row = {"input_ids": [1, 2], "labels": [1, 2]}
    if not packing:
        row["position_ids"] = [0, 1]
    with pytest.raises(ValueError, match="disagree on packing"):
        build_collator(tokenizer, "causal_lm", packing=packing)([row])


def test_classification_padding_values(tokenizer: PreTrainedTokenizerFast) -> None:
    pad = tokenizer.pad_token_id
    collate = build_collator(tokenizer, "classification")

    batch = collate(
        [
            {"input_ids": [11, 12, 13], "attention_mask": [1, 1, 1], "labels": 2},
            {"input_ids": [21], "attention_mask": [1], "labels": 0},
        ]
    )

    assert batch["input_ids"].tolist() == [[11, 12, 13], [21, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [2, 0]


def test_unknown_task_and_packed_classification_are_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        build_collator(tokenizer, "seq2seq")
    with pytest.raises(ValueError, match="causal_lm only"):
        build_collator(tokenizer, "classification", packing=True)
