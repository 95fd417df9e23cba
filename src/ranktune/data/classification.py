"""Sequence classification examples: text (or a text pair) -> token ids, and a label -> a class id.

Labels are mapped by one rule in every split: a string label is a class *name* (looked up in the label names), an
integer label is a class *id* (checked against the number of classes). One column holds one kind: names and ids
mixed would turn the ids into positions in the sorted names. Padding is left to the collator, so each batch is padded
only to its own longest example.
"""

from __future__ import annotations

import math
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from ranktune.config import DataConfig
from ranktune.data.sources import require_columns, require_texts
from ranktune.errors import UserInputError


def prepare_classification(
    splits: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    config: DataConfig,
    label_names: list[str] | None = None,
    num_labels: int | None = None,
) -> tuple[DatasetDict, list[str]]:
    """Tokenizes every split and maps its labels to class ids.

    Args:
        splits: the raw splits; "train" is required when `label_names` is None (the names are inferred from it).
        tokenizer: truncates to `config.max_length`; no padding here.
        config: the column names and `max_length`.
        label_names: the names of a trained adapter's classes (index = class id); inferred from train when None.
        num_labels: the model's class count, when the config fixes it.

    Returns:
        The splits with columns input_ids, attention_mask (token_type_ids when the tokenizer makes them) and labels,
        and the label names.

    Raises:
        UserInputError: packing was asked for, a column is missing, a text is not a string, a label is invalid, a
            label column mixes names and ids, or train has fewer than two classes.
    """
    if config.packing:
        raise UserInputError("data.packing applies to model.task causal_lm only; set it to false for classification")
    columns = {"data.text_column": config.text_column, "data.label_column": config.label_column}
    if config.text_pair_column:
        columns["data.text_pair_column"] = config.text_pair_column
    for name, split in splits.items():
        require_columns(split, name, columns)
        _require_one_label_kind(split, name, config.label_column)
    names = list(label_names) if label_names else infer_label_names(splits["train"], config.label_column, num_labels)
    prepared = DatasetDict(
        {
            name: _tokenize(split, name, tokenizer, config, {label: i for i, label in enumerate(names)})
            for name, split in splits.items()
        }
    )
    return prepared, names


def infer_label_names(train: Dataset, column: str, num_labels: int | None = None) -> list[str]:
    """The class names, index = class id, from the training labels.

    A `ClassLabel` column (hub datasets) keeps its names; string labels become their sorted unique values; integer
    labels become "0" .. str(n - 1), with n = `num_labels` or the largest label + 1.

    Raises:
        UserInputError: no valid label, train holds a single class, or `num_labels` disagrees with the string labels.
    """
    feature = train.features[column]
    values = [_label_value(value, "train", column, row) for row, value in enumerate(train[column])]
    _require_two_classes(values, column)
    if isinstance(feature, ClassLabel) and num_labels in (None, feature.num_classes):
        return list(feature.names)
    strings = sorted({value for value in values if isinstance(value, str)})
    if strings:
        if num_labels is not None and num_labels != len(strings):
            raise UserInputError(
                f"model.num_labels is {num_labels} but the train split has {len(strings)} distinct labels "
                f"{strings}; remove model.num_labels or make them agree"
            )
        return strings
    count = num_labels if num_labels is not None else max(values) + 1
    return [str(i) for i in range(count)]


def _require_one_label_kind(split: Dataset, name: str, column: str) -> None:
    """Refuses a label column holding both class names (strings) and class ids (integers)."""
    if isinstance(split.features[column], ClassLabel):
        return
    first: dict[type, str | int] = {}
    for row, value in enumerate(split[column]):
        label = _label_value(value, name, column, row)
        first.setdefault(type(label), label)
        if len(first) == 2:
            raise UserInputError(
                f"the {name} split's label column '{column}' mixes class names and class ids (strings such as "
                f"{first[str]!r} and integers such as {first[int]!r}); use names or ids (0, 1, ...) throughout"
            )


def _require_two_classes(values: list[str | int], column: str) -> None:
    """Refuses a train split with a single class: there is nothing to tell apart, and one label makes a regressor."""
    classes = set(values)
    if len(classes) < 2:
        shown = ", ".join(map(repr, classes))
        raise UserInputError(
            f"the train split has a single class: label column '{column}' holds {shown} in all {len(values)} of its "
            "examples; classification needs examples of at least two classes"
        )


def _tokenize(
    split: Dataset, name: str, tokenizer: PreTrainedTokenizerBase, config: DataConfig, class_ids: dict[str, int]
) -> Dataset:
    def encode(batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
        texts = require_texts(batch[config.text_column], name, config.text_column, rows)
        pairs = None
        if config.text_pair_column:
            pairs = require_texts(batch[config.text_pair_column], name, config.text_pair_column, rows)
        encoded = dict(tokenizer(texts, pairs, truncation=True, max_length=config.max_length))
        labels = batch[config.label_column]
        encoded["labels"] = [
            _class_id(_label_value(value, name, config.label_column, row), class_ids, name, row)
            for value, row in zip(labels, rows, strict=True)
        ]
        return encoded

    return split.map(encode, batched=True, with_indices=True, remove_columns=split.column_names)


def _label_value(value: Any, split: str, column: str, row: int) -> str | int:
    """A label as a class name (str) or a class id (int); integral floats (CSV columns with gaps) count as ids."""
    if isinstance(value, str):
        return value
    if isinstance(value, int):  # bool included: False / True are ids 0 / 1
        return int(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise UserInputError(
        f"the {split} split, example {row}: label column '{column}' holds {value!r}; "
        "expected a class name (string) or a class id (integer)"
    )


def _class_id(value: str | int, class_ids: dict[str, int], split: str, row: int) -> int:
    valid = ", ".join(class_ids)
    if isinstance(value, str):
        if value not in class_ids:
            raise UserInputError(
                f"the {split} split, example {row}: label {value!r} was not seen in training; valid labels: {valid}"
            )
        return class_ids[value]
    if not 0 <= value < len(class_ids):
        raise UserInputError(
            f"the {split} split, example {row}: label {value} is outside [0, {len(class_ids)}); "
            f"valid labels are the class ids 0..{len(class_ids) - 1} ({valid})"
        )
    return value
