"""Each kind of bad input: one clear message, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.helpers import assert_clean_error, run_cli

CONFIG = """\
model: {{name_or_path: {model}, task: classification}}
data: {{train: {train}, max_length: 32}}
lora: {{r: {r}, target_modules: {targets}}}
training: {{max_steps: 2, per_device_train_batch_size: 4, save_strategy: "no"}}
output_dir: {output_dir}
"""


@pytest.fixture
def job(tmp_path, make_model_dir):
    """Writes a valid classification config on a tiny BERT; tests break one thing in it."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(f'{{"text": "example number {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(20)))
    values = {
        "model": str(make_model_dir("bert", "classification")),
        "train": str(train),
        "r": 4,
        "targets": "all-linear",
        "output_dir": str(tmp_path / "out"),
    }

    def write(**changes) -> Path:
        path = tmp_path / "run.yaml"
        path.write_text(CONFIG.format(**{**values, **changes}))
        return path

    return write


def test_missing_config(tmp_path):
    assert_clean_error(run_cli("train", str(tmp_path / "absent.yaml")), 2, "config file not found")


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name_or_path: x\n")
    assert_clean_error(run_cli("train", str(path)), 2, "malformed YAML", "line")


def test_unknown_key(job):
    assert_clean_error(run_cli("train", str(job()), "lora.alpah=4"), 2, "unknown key 'lora.alpah'", "'alpha'")


def test_wrong_type(job):
    assert_clean_error(run_cli("train", str(job(r="big"))), 2, "'lora.r'", "integer")


def test_rank_zero(job):
    assert_clean_error(run_cli("train", str(job(r=0))), 2, "'lora.r'", "greater than 0")


def test_missing_data_file(job, tmp_path):
    assert_clean_error(run_cli("train", str(job(train=tmp_path / "none.jsonl"))), 2, "none.jsonl")


def test_empty_dataset(job, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_clean_error(run_cli("train", str(job(train=empty))), 2, "empty.jsonl")


def test_missing_label_column_lists_columns(job, tmp_path):
    data = tmp_path / "nolabel.jsonl"
    data.write_text('{"text": "a", "target": 1}\n' * 10)
    assert_clean_error(run_cli("train", str(job(train=data))), 2, "label", "target", "text")


def test_label_outside_num_labels(job, tmp_path):
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(f'{{"text": "t{i}", "label": {i % 3}}}\n' for i in range(12)))
    result = run_cli("train", str(job(train=data)), "model.num_labels=2")
    assert_clean_error(result, 2, "label 2 is outside [0, 2)")


def test_missing_text_column_lists_columns(job, tmp_path):
    data = tmp_path / "notext.jsonl"
    data.write_text('{"sentence": "a", "label": 1}\n' * 10)
    assert_clean_error(run_cli("train", str(job(train=data))), 2, "'text'", "sentence", "label")


def test_unreadable_config(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: {name_or_path: caf\xe9}\n".encode("latin-1"))
    assert_clean_error(run_cli("train", str(path)), 2, "cannot read config file")


def test_earlier_run_is_not_mixed_with_a_new_one(job, tmp_path):
    stale = tmp_path / "out" / "checkpoint-500"
    stale.mkdir(parents=True)
    assert_clean_error(run_cli("train", str(job())), 2, "earlier run", "checkpoint-500", "--overwrite")
    assert stale.is_dir()


def test_bad_batch_size_for_eval(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    assert_clean_error(run_cli("eval", str(tmp_path), "--data", "x.jsonl", "--batch-size", "0"), 2, "--batch-size")


def test_target_modules_matching_nothing_lists_linear_modules(job):
    result = run_cli("train", str(job(targets="[q_proj]")))
    assert_clean_error(result, 2, "matches no linear module", "query", "value", "dense")


def test_output_dir_not_writable(job, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_clean_error(run_cli("train", str(job(output_dir=blocker / "out"))), 2, "not writable")


def test_not_an_adapter_directory(tmp_path):
    for command in (
        ["eval", str(tmp_path), "--data", "x.jsonl"],
        ["inspect", str(tmp_path)],
        ["merge", str(tmp_path), "--out", str(tmp_path / "m")],
        ["generate", str(tmp_path), "--prompt", "hi"],
    ):
        assert_clean_error(run_cli(*command), 2, "is not an adapter directory")
    assert not (tmp_path / "m").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "train", str(tmp_path / "absent.yaml"))
    assert result.returncode != 0 and "Traceback" in result.stderr
