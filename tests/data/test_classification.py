"""Tokenizing classification examples and mapping their labels to class ids."""

from __future__ import annotations

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Json, Value
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from ranktune.config import DataConfig
from ranktune.data import prepare_classification
from ranktune.errors import UserInputError

CONFIG = DataConfig(train="unused", max_length=16)


def splits_of(**columns_by_split: dict[str, list]) -> DatasetDict:
    return DatasetDict({name: Dataset.from_dict(columns) for name, columns in columns_by_split.items()})


def char_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """The tiny tokenizer is character-level: one id per character, straight from the vocabulary."""
    vocab = tokenizer.get_vocab()
    return [vocab[char] for char in text]


def test_string_labels_map_to_sorted_names(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = splits_of(
        train={"text": ["a", "b", "c", "d"], "label": ["pos", "neg", "neutral", "pos"]},
        validation={"text": ["e"], "label": ["neutral"]},
    )

    prepared, names = prepare_classification(splits, tokenizer, CONFIG)

    assert names == ["neg", "neutral", "pos"]
    assert prepared["train"]["labels"] == [2, 0, 1, 2]
    assert prepared["validation"]["labels"] == [1]


def test_outputs_are_tokenized_truncated_and_unpadded(tokenizer: PreTrainedTokenizerFast) -> None:
    long_text = "abcdefghijklmnopqrstuvwxyz"
    splits = splits_of(train={"text": ["hi", long_text], "label": [0, 1], "extra": [1, 2]})

    prepared, _ = prepare_classification(splits, tokenizer, CONFIG)

    assert sorted(prepared["train"].column_names) == ["attention_mask", "input_ids", "labels"]
    assert prepared["train"]["input_ids"] == [char_ids(tokenizer, "hi"), char_ids(tokenizer, long_text[:16])]
    assert prepared["train"]["attention_mask"] == [[1, 1], [1] * 16]


def test_int_labels_with_num_labels_name_every_class(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = splits_of(train={"text": ["a", "b"], "label": [0, 2]})

    prepared, names = prepare_classification(splits, tokenizer, CONFIG, num_labels=4)

    assert names == ["0", "1", "2", "3"]
    assert prepared["train"]["labels"] == [0, 2]


def test_int_labels_without_num_labels_use_largest_plus_one(tokenizer: PreTrainedTokenizerFast) -> None:
    _, names = prepare_classification(splits_of(train={"text": ["a", "b"], "label": [0, 2]}), tokenizer, CONFIG)
    assert names == ["0", "1", "2"]


def test_given_label_names_win_over_inference(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = splits_of(train={"text": ["a", "b"], "label": ["yes", "no"]})

    prepared, names = prepare_classification(splits, tokenizer, CONFIG, label_names=["yes", "no"])

    assert names == ["yes", "no"]
    assert prepared["train"]["labels"] == [0, 1]


def test_class_label_feature_keeps_its_names(tokenizer: PreTrainedTokenizerFast) -> None:
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    splits = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]}, features=features)})

    prepared, names = prepare_classification(splits, tokenizer, CONFIG)

    assert names == ["negative", "positive"]
    assert prepared["train"]["labels"] == [1, 0]


def test_out_of_range_label_names_split_value_and_valid_labels(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = splits_of(train={"text": ["a", "b"], "label": [0, 1]}, validation={"text": ["c"], "label": [5]})
    with pytest.raises(UserInputError) as error:
        prepare_classification(splits, tokenizer, CONFIG, num_labels=2)
    message = str(error.value)
    assert "validation split" in message
    assert "label 5 is outside [0, 2)" in message
    assert "0..1" in message


def test_unseen_string_label_names_split_value_and_valid_labels(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = splits_of(train={"text": ["a", "b"], "label": ["neg", "pos"]}, test={"text": ["c"], "label": ["meh"]})
    with pytest.raises(UserInputError) as error:
        prepare_classification(splits, tokenizer, CONFIG)
    message = str(error.value)
    assert "test split" in message
    assert "'meh' was not seen in training" in message
    assert "neg, pos" in message


def test_num_labels_disagreeing_with_string_labels_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = splits_of(train={"text": ["a", "b"], "label": ["neg", "pos"]})
    with pytest.raises(UserInputError, match=r"model.num_labels is 3 but the train split has 2 distinct labels"):
        prepare_classification(splits, tokenizer, CONFIG, num_labels=3)


@pytest.mark.parametrize(
    ("overrides", "missing"),
    [({"text_column": "sentence"}, "sentence"), ({"label_column": "y"}, "y"), ({"text_pair_column": "b"}, "b")],
)
def test_missing_column_lists_existing_ones(tokenizer: PreTrainedTokenizerFast, overrides: dict, missing: str) -> None:
    splits = splits_of(train={"text": ["a"], "label": [0]})
    config = CONFIG.model_copy(update=overrides)
    with pytest.raises(UserInputError, match=f"no column '{missing}'.*its columns are: text, label"):
        prepare_classification(splits, tokenizer, config)


def test_non_text_value_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = splits_of(train={"text": ["a", None], "label": [0, 1]})
    with pytest.raises(UserInputError, match="example 1: column 'text' must hold text, got None"):
        prepare_classification(splits, tokenizer, CONFIG)


def test_packing_is_rejected(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = splits_of(train={"text": ["a"], "label": [0]})
    with pytest.raises(UserInputError, match=r"packing applies to model.task causal_lm only"):
        prepare_classification(splits, tokenizer, CONFIG.model_copy(update={"packing": True}))


def test_pairs_are_tokenized_as_pairs(tokenizer: PreTrainedTokenizerFast) -> None:
    """With a BERT-style post-processor, a pair is `<s> A </s> B </s>` with token types 0 for A and 1 for B."""
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B:1 </s>:1",
        special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)],
    )
    tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    splits = splits_of(train={"premise": ["ab", "c"], "hypothesis": ["xyz", "d"], "label": [1, 0]})
    config = CONFIG.model_copy(update={"text_column": "premise", "text_pair_column": "hypothesis"})

    prepared, _ = prepare_classification(splits, tokenizer, config)

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    row = prepared["train"][0]
    assert row["input_ids"] == [bos, *char_ids(tokenizer, "ab"), eos, *char_ids(tokenizer, "xyz"), eos]
    assert row["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert row["labels"] == 1


def test_pair_truncation_keeps_both_texts(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = splits_of(train={"a": ["abcdefghij", "k"], "b": ["0123456789", "l"], "label": [0, 1]})
    config = CONFIG.model_copy(update={"text_column": "a", "text_pair_column": "b", "max_length": 8})

    prepared, _ = prepare_classification(splits, tokenizer, config)

    assert prepared["train"][0]["input_ids"] == char_ids(tokenizer, "abcd") + char_ids(tokenizer, "0123")


@pytest.mark.parametrize("split", ["train", "validation"])
def test_names_and_ids_mixed_in_one_column_are_an_error(tokenizer: PreTrainedTokenizerFast, split: str) -> None:
    """As JSON lines load them: a column of JSON values, strings and integers side by side."""
    features = Features({"text": Value("string"), "label": Json()})
    columns = {"train": {"text": ["a", "b", "c"], "label": ["neg", "pos", "neg"]}}
    columns[split] = {"text": ["a", "b", "c"], "label": ["neg", 1, "pos"]}
    splits = DatasetDict({name: Dataset.from_dict(data, features=features) for name, data in columns.items()})
    with pytest.raises(UserInputError) as error:
        prepare_classification(splits, tokenizer, CONFIG)
    message = str(error.value)
    assert f"the {split} split's label column 'label' mixes class names and class ids" in message
    assert "(strings such as 'neg' and integers such as 1)" in message


@pytest.mark.parametrize(
    ("labels", "num_labels", "shown"), [(["pos", "pos"], None, "'pos'"), ([0, 0], None, "0"), ([1, 1], 3, "1")]
)
def test_a_single_class_in_train_is_an_error(
    tokenizer: PreTrainedTokenizerFast, labels: list, num_labels: int | None, shown: str
) -> None:
    splits = splits_of(train={"text": ["a", "b"], "label": labels})
    with pytest.raises(
        UserInputError, match=f"single class: label column 'label' holds {shown} in all 2 of its examples"
    ):
        prepare_classification(splits, tokenizer, CONFIG, num_labels=num_labels)


def test_a_single_class_label_feature_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    splits = DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": [1, 1]}, features=features)})
    with pytest.raises(UserInputError, match="single class"):
        prepare_classification(splits, tokenizer, CONFIG)


def test_an_evaluation_split_may_hold_one_class(tokenizer: PreTrainedTokenizerFast) -> None:
    splits = splits_of(test={"text": ["a", "b"], "label": ["pos", "pos"]})
    prepared, _ = prepare_classification(splits, tokenizer, CONFIG, label_names=["neg", "pos"])
    assert prepared["test"]["labels"] == [1, 1]
