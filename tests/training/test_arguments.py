"""TrainingArguments from the config: our defaults, the user's values over them, and refused combinations."""

from __future__ import annotations

import pytest

from ranktune.config import validate_config
from ranktune.errors import UserInputError
from ranktune.training.arguments import build_training_arguments


def config(packing: bool = False, **training):
    return validate_config(
        {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl", "packing": packing}, "training": training}
    )


def test_defaults_and_user_values(tmp_path):
    args = build_training_arguments(config(learning_rate="1e-4", warmup_ratio=0.1), tmp_path, has_validation=True)
    assert args.learning_rate == pytest.approx(1e-4) and args.warmup_steps == 0.1
    assert args.eval_strategy == "epoch" and args.save_strategy == "epoch"
    assert args.train_sampling_strategy == "group_by_length"
    assert args.include_num_input_tokens_seen == "non_padding" and args.label_names == ["labels"]
    assert build_training_arguments(config(), tmp_path, has_validation=False).eval_strategy == "no"


def test_packing_samples_randomly_and_refuses_the_kv_cache(tmp_path):
    assert build_training_arguments(config(packing=True), tmp_path, True).train_sampling_strategy == "random"
    with pytest.raises(UserInputError, match="use_cache"):
        build_training_arguments(config(packing=True, use_cache=True), tmp_path, True)


def test_values_transformers_rejects_become_a_config_error(tmp_path):
    with pytest.raises(UserInputError, match="invalid 'training' section"):
        build_training_arguments(config(lr_scheduler_type="sideways"), tmp_path, True)
