"""Batches: examples padded to the longest one in the batch (dynamic padding), for both tasks.

Causal LM rows are padded on the right: input_ids with the pad id, labels with -100 (no loss on padding). Unpacked
rows get an attention_mask (0 on padding). Packed rows get none on purpose: transformers only derives the
per-example (block-diagonal) mask from `position_ids` when attention_mask is None. Their padding gets position_ids
0, 1, ... so it forms a segment of its own, which no real token attends to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from ranktune.config import Task
from ranktune.data.causal_lm import IGNORE_INDEX


def build_collator(tokenizer: PreTrainedTokenizerBase, task: Task, packing: bool = False):
    """The collator for a task.

    Args:
        tokenizer: gives the pad token id (and, for classification, pads every model input).
        task: "classification" or "causal_lm".
        packing: the causal LM rows were packed by `prepare_causal_lm` (they carry position_ids).

    Returns:
        A callable turning a list of rows into a dict of tensors.

    Raises:
        ValueError: an unknown task, or packing for classification (which `prepare_classification` rejects).
    """
    if task == "classification":
        if packing:
            raise ValueError("packing applies to causal_lm only")
        return DataCollatorWithPadding(tokenizer)
    if task == "causal_lm":
        return CausalLMCollator(pad_token_id=tokenizer.pad_token_id, packed=packing)
    raise ValueError(f"unknown task {task!r}")


@dataclass(frozen=True)
class CausalLMCollator:
    """Pads causal LM rows to the longest in the batch.

    Attributes:
        pad_token_id: the input id on padding.
        packed: rows carry position_ids (packed examples): emit position_ids and no attention_mask.
    """

    pad_token_id: int
    packed: bool = False

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(row["input_ids"]) for row in features])  # (B,)
        width = int(lengths.max())
        batch = {
            "input_ids": _pad([row["input_ids"] for row in features], self.pad_token_id, width),  # (B, T)
            "labels": _pad([row["labels"] for row in features], IGNORE_INDEX, width),  # (B, T)
        }
        has_positions = "position_ids" in features[0]
        if has_positions != self.packed:
            raise ValueError(
                "rows and collator disagree on packing: build the collator with packing=True exactly when "
                "prepare_causal_lm packed the rows (data.packing)"
            )
        if self.packed:
            batch["position_ids"] = _pad_positions([row["position_ids"] for row in features], width)  # (B, T)
        else:
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (B, T)
        return batch


def _pad(rows: Sequence[Sequence[int]], value: int, width: int) -> torch.Tensor:
    """Right-pads rows of ids to `width` with `value`; returns (B, width) int64."""
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _pad_positions(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """Right-pads position_ids with 0, 1, ...: the padding restarts at 0, so it is a packed segment of its own."""
    out = torch.empty((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        out[i, len(row) :] = torch.arange(width - len(row))
    return out
