"""Config validation: the documented example, and one clear message per kind of bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ranktune.config import load_config
from ranktune.errors import UserInputError

ISSUE_EXAMPLE = """\
model:
  name_or_path: asset:minilm-l6        # or a hub id, or a local folder
  task: classification                 # causal_lm | classification
data:
  train: data/train.jsonl              # local json/jsonl/csv/parquet/txt, or a hub dataset name
  validation: data/validation.jsonl    # optional: a seeded split is made when absent
  text_column: text                    # classification pairs: text_column + text_pair_column
  label_column: label
  max_length: 128
lora:
  r: 8
  alpha: 16
  dropout: 0.05
  target_modules: all-linear
allocation:
  method: none                         # later issues add l1ra, adalora, hetero
training:                              # passed to transformers.TrainingArguments
  num_train_epochs: 1
  per_device_train_batch_size: 32
  learning_rate: 5.0e-4
output_dir: runs/quickstart
"""


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserInputError) as caught:
        load_config(path, overrides)
    assert caught.value.exit_code == 2
    return str(caught.value)


def test_issue_example_validates_as_written(tmp_path):
    config = load_config(write(tmp_path, ISSUE_EXAMPLE))
    assert config.model.task == "classification"
    assert config.lora.r == 8 and config.lora.alpha == 16.0 and config.lora.target_modules == "all-linear"
    assert config.data.max_length == 128 and config.data.validation == "data/validation.jsonl"
    assert config.training == {"num_train_epochs": 1, "per_device_train_batch_size": 32, "learning_rate": 5.0e-4}
    assert config.output_dir == "runs/quickstart"


@pytest.mark.parametrize("example", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")), ids=str)
def test_every_example_config_validates(example):
    config = load_config(example)
    assert config.data.train.startswith("asset:") and config.model.name_or_path.startswith("asset:")


def test_toml_and_json_are_accepted(tmp_path):
    toml = write(tmp_path, '[model]\nname_or_path = "m"\n[data]\ntrain = "t.jsonl"\n[lora]\nr = 4\n', "run.toml")
    json_file = write(tmp_path, '{"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}', "run.json")
    assert load_config(toml).lora.r == 4
    assert load_config(json_file).lora.r == 8


def test_output_dir_defaults_to_runs_and_the_config_name(tmp_path):
    path = write(tmp_path, "model: {name_or_path: m}\ndata: {train: t.jsonl}\n", "my-job.yaml")
    assert load_config(path).output_dir == str(Path("runs") / "my-job")


def test_peft_spellings_are_aliases(tmp_path):
    text = "model: {name_or_path: m}\ndata: {train: t}\nlora: {lora_alpha: 32, lora_dropout: 0.1, use_rslora: true}\n"
    lora = load_config(write(tmp_path, text)).lora
    assert (lora.alpha, lora.dropout, lora.rslora) == (32.0, 0.1, True)


def test_overrides_set_dotted_keys_with_yaml_values(tmp_path):
    config = load_config(
        write(tmp_path, ISSUE_EXAMPLE),
        ["lora.r=16", "training.learning_rate=1e-4", "lora.target_modules=[query, value]", "data.packing=true"],
    )
    assert config.lora.r == 16
    assert config.training["learning_rate"] == pytest.approx(1e-4)
    assert config.lora.target_modules == ["query", "value"]
    assert config.data.packing is True


def test_yaml_1e_minus_4_is_a_number(tmp_path):
    config = load_config(write(tmp_path, ISSUE_EXAMPLE.replace("5.0e-4", "1e-4")))
    assert config.training["learning_rate"] == pytest.approx(1e-4)


def test_yaml_no_means_the_strategy_no(tmp_path):
    config = load_config(write(tmp_path, ISSUE_EXAMPLE), ["training.eval_strategy=no", "training.save_strategy=no"])
    assert config.training["eval_strategy"] == "no" and config.training["save_strategy"] == "no"


def test_transformers_4_names_are_renamed(tmp_path):
    text = ISSUE_EXAMPLE.replace("learning_rate: 5.0e-4", "warmup_ratio: 0.1")
    assert load_config(write(tmp_path, text)).training["warmup_steps"] == 0.1


def test_a_transformers_4_name_next_to_its_new_name_is_refused(tmp_path):
    path = write(tmp_path, ISSUE_EXAMPLE.replace("learning_rate: 5.0e-4", "warmup_ratio: 0.1"))
    message = error_of(path, ["training.warmup_steps=10"])
    assert message.endswith(
        "'training.warmup_ratio': the transformers 4 name of training.warmup_steps, set too; keep one"
    )


def test_unknown_key_names_key_and_closest(tmp_path):
    message = error_of(write(tmp_path, ISSUE_EXAMPLE.replace("  r: 8", "  rr: 8")))
    assert "unknown key 'lora.rr'" in message and "Did you mean 'r'?" in message


def test_unknown_section_names_closest(tmp_path):
    message = error_of(write(tmp_path, ISSUE_EXAMPLE.replace("lora:", "lorra:")))
    assert "unknown key 'lorra'" in message and "'lora'" in message


def test_unknown_training_key_names_closest_field(tmp_path):
    message = error_of(write(tmp_path, ISSUE_EXAMPLE.replace("learning_rate:", "learning_rat:")))
    assert "unknown key 'training.learning_rat'" in message and "Did you mean 'learning_rate'?" in message


def test_wrong_type_names_key_and_expectation(tmp_path):
    message = error_of(write(tmp_path, ISSUE_EXAMPLE.replace("max_length: 128", "max_length: long")))
    assert "'data.max_length'" in message and "integer" in message and "'long'" in message


def test_wrong_training_type_names_key(tmp_path):
    message = error_of(write(tmp_path, ISSUE_EXAMPLE.replace("num_train_epochs: 1", "num_train_epochs: two")))
    assert "'training.num_train_epochs' expects float, got str 'two'" in message


@pytest.mark.parametrize("rank", ["0", "-4"])
def test_rank_must_be_positive(tmp_path, rank):
    message = error_of(write(tmp_path, ISSUE_EXAMPLE.replace("  r: 8", f"  r: {rank}")))
    assert "'lora.r'" in message and "greater than 0" in message


def test_bad_task_lists_choices(tmp_path):
    message = error_of(write(tmp_path, ISSUE_EXAMPLE.replace("task: classification", "task: regression")))
    assert "'model.task'" in message and "'causal_lm'" in message and "'classification'" in message


def test_missing_required_key(tmp_path):
    message = error_of(write(tmp_path, "model: {name_or_path: m}\n"))
    assert "missing required key 'data'" in message


def test_missing_config_file(tmp_path):
    assert "config file not found" in error_of(tmp_path / "nope.yaml")


def test_a_directory_is_not_a_config_file(tmp_path):
    assert error_of(tmp_path).endswith(f"{tmp_path} is a directory; expected a config file (.yaml, .toml or .json)")


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "run.yaml",
            "model: {name_or_path: m}\ndata: {train: t}\nlora:\n  r: 4\n  alpha: 8\n  r: 16\n",
            "malformed YAML in {path} at line 6, column 3: duplicate key 'r' (first at line 4); give each key once",
        ),
        (
            "run.json",
            '{"model": {"name_or_path": "m"}, "data": {"train": "t"}, "lora": {"r": 4, "r": 16}}',
            "malformed JSON in {path}: duplicate key 'r' in one object; give each key once",
        ),
        ("run.toml", '[model]\nname_or_path = "m"\nname_or_path = "n"\n', "malformed TOML in {path}"),
    ],
    ids=["yaml", "json", "toml"],
)
def test_a_key_given_twice_is_refused(tmp_path, name, text, expected):
    path = write(tmp_path, text, name)
    assert expected.format(path=path) in error_of(path)


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    text = (
        "model: {name_or_path: m}\ndata: {train: t}\n"
        "lora:\n  modules:\n    q_proj: &q {r: 4, alpha: 8}\n    v_proj:\n      <<: *q\n      r: 16\n"
    )
    modules = load_config(write(tmp_path, text)).lora.modules
    assert (modules["q_proj"].r, modules["v_proj"].r, modules["v_proj"].alpha) == (4, 16, 8.0)


def test_a_key_given_twice_in_an_override_is_refused(tmp_path):
    message = error_of(write(tmp_path, ISSUE_EXAMPLE), ["lora.rank_pattern={query: 4, query: 8}"])
    assert message == "override 'lora.rank_pattern={query: 4, query: 8}': duplicate key 'query'; give each key once"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("training.learning_rate=-1", "'training.learning_rate': must be >= 0 (got -1)"),
        ("training.learning_rate=-1e-4", "'training.learning_rate': must be >= 0 (got -1e-4)"),
        (
            "training.per_device_train_batch_size=0",
            "'training.per_device_train_batch_size': must be at least 1 (got 0)",
        ),
        ("training.per_device_eval_batch_size=-8", "'training.per_device_eval_batch_size': must be at least 1"),
        ("training.gradient_accumulation_steps=0", "'training.gradient_accumulation_steps': must be at least 1"),
        ("training.max_steps=0", "'training.max_steps': must be a number of steps > 0, or -1 to train for"),
        ("training.max_steps=-5", "'training.max_steps': must be a number of steps > 0, or -1"),
        ("training.num_train_epochs=0", "'training.num_train_epochs': must be > 0 (0 would save an untrained adapter"),
        ("training.num_train_epochs=-1", "'training.num_train_epochs': must be > 0"),
        ("training.logging_steps=0", "'training.logging_steps': must be > 0: a number of steps, or a fraction"),
        ("training.save_steps=-10", "'training.save_steps': must be > 0"),
        ("training.eval_steps=0", "'training.eval_steps': must be > 0"),
        ("training.weight_decay=-0.1", "'training.weight_decay': must be >= 0"),
        ("training.adam_beta2=1", "'training.adam_beta2': must be in [0, 1)"),
        ("training.dataloader_num_workers=-1", "'training.dataloader_num_workers': must be >= 0"),
        ("model.num_labels=1", "'model.num_labels': Input should be greater than or equal to 2 (got 1)"),
    ],
)
def test_training_numbers_that_fail_only_after_the_model_loads_are_config_errors(tmp_path, override, expected):
    assert expected in error_of(write(tmp_path, ISSUE_EXAMPLE), [override])


def test_in_range_training_numbers_are_accepted(tmp_path):
    overrides = [
        "training.max_steps=5",
        "training.num_train_epochs=0",
        "training.learning_rate=0",
        "training.warmup_steps=0.1",
    ]
    training = load_config(write(tmp_path, ISSUE_EXAMPLE), overrides).training
    assert training["max_steps"] == 5 and training["num_train_epochs"] == 0 and training["learning_rate"] == 0
    assert load_config(write(tmp_path, ISSUE_EXAMPLE), ["training.max_steps=-1"]).training["max_steps"] == -1


OVERRIDE_IN_A_FRESH_PROCESS = """
import sys
from ranktune.cli.main import main
code = main(["train", sys.argv[1], *sys.argv[2:]])
print(code, "torch" in sys.modules, "transformers" in sys.modules)
"""


@pytest.mark.parametrize("override", ["lora.alpah=4", "training.learning_rate=-1", "lora.r=0", "data.nope=1"])
def test_an_override_mistake_is_reported_before_torch_is_imported(tmp_path, override):
    """A config with a `training` section: checking its keys imports transformers and torch, but only last."""
    path = write(tmp_path, ISSUE_EXAMPLE)
    result = subprocess.run(
        [sys.executable, "-c", OVERRIDE_IN_A_FRESH_PROCESS, str(path), override],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.split() == ["2", "False", "False"], (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, result.stderr


def test_malformed_yaml_gives_the_line(tmp_path):
    message = error_of(write(tmp_path, "model:\n  name_or_path: [unclosed\ndata: {train: x}\n"))
    assert "malformed YAML" in message and "line" in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_bad_override_syntax(tmp_path):
    assert "dotted.key=value" in error_of(write(tmp_path, ISSUE_EXAMPLE), ["lora.r"])


def test_output_dir_inside_training_is_refused(tmp_path):
    text = ISSUE_EXAMPLE.replace("  num_train_epochs: 1", "  output_dir: x\n  num_train_epochs: 1")
    assert "top-level 'output_dir'" in error_of(write(tmp_path, text))


def adalora_example(tmp_path: Path, *lines: str) -> Path:
    block = "allocation:\n  method: adalora\n" + "".join(f"  {line}\n" for line in lines)
    return write(
        tmp_path,
        ISSUE_EXAMPLE.replace(
            "allocation:\n  method: none                         # later issues add l1ra, adalora, hetero\n", block
        ),
    )


def test_adalora_ranks_default_from_lora_r(tmp_path):
    allocation = load_config(adalora_example(tmp_path)).allocation
    assert allocation.method == "adalora" and allocation.ranks(8) == (12, 8)
    assert load_config(adalora_example(tmp_path, "target_r: 4")).allocation.ranks(8) == (6, 4)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["init_r: 4", "target_r: 6"], "allocation.target_r (6) must be below allocation.init_r (4)"),
        (["init_r: 6", "target_r: 6"], "allocation.target_r (6) must be below allocation.init_r (6)"),
        (["tinit: 1.5"], "'allocation.tinit': a fraction must be below 1, got 1.5"),
        (["delta_t: 5"], "Did you mean 'deltaT'?"),
        (["beta1: 1.0"], "'allocation.beta1'"),
    ],
)
def test_bad_adalora_settings_are_named(tmp_path, lines, expected):
    assert expected in error_of(adalora_example(tmp_path, *lines))


def test_adalora_refuses_lora_settings_it_would_ignore(tmp_path):
    text = adalora_example(tmp_path).read_text().replace("  dropout: 0.05", "  dropout: 0.05\n  use_rslora: true")
    assert "allocation.method 'adalora' does not support lora.rslora" in error_of(write(tmp_path, text))


def test_max_rank_below_lora_r_is_refused(tmp_path):
    text = ISSUE_EXAMPLE.replace("method: none", "method: l1ra\n  max_rank: 4")
    assert error_of(write(tmp_path, text)).endswith("allocation.max_rank (4) must be at least lora.r (8)")


def test_switching_allocation_method_by_override_names_the_stale_keys(tmp_path):
    text = ISSUE_EXAMPLE.replace("method: none", "method: l1ra\n  eta_c: 0.05")
    message = error_of(write(tmp_path, text), ["allocation.method=none"])
    assert "'allocation.eta_c' does not apply: allocation.method 'none' takes no other keys" in message
    assert "`allocation={method: none}`" in message
    assert load_config(write(tmp_path, text), ["allocation={method: none}"]).allocation.method == "none"


def test_unknown_allocation_method_and_bad_target_regex_are_named(tmp_path):
    path = write(tmp_path, ISSUE_EXAMPLE)
    message = error_of(path, ["allocation.method=l1raa"])
    expected = "'none', 'gradient', 'l1ra', 'adalora', 'hetero', 'eva'"
    assert f"unknown allocation.method 'l1raa'; expected one of {expected}" in message
    message = error_of(path, ["lora.target_modules=[q_proj, v_proj"])
    assert "'lora.target_modules': is not a valid regular expression" in message
