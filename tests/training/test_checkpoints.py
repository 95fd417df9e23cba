"""Checkpoints: our files written before the Trainer's, resuming from the newest complete one, and an allocation
state that is never unpickled beyond tensors and plain values."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch
import transformers.trainer
import yaml
from transformers.trainer_callback import TrainerState

from ranktune.allocation.callback import ALLOCATION_STATE
from ranktune.config import validate_config
from ranktune.errors import UserInputError
from ranktune.training import train
from ranktune.training.checkpoints import TRAINER_STATE, is_complete, select_resume_checkpoint
from tests.cli.helpers import assert_clean_error, run_cli
from tests.training.test_hetero_run import hetero_config
from tests.training.test_l1ra_run import l1ra_config

OURS = ("adapter_model.safetensors", ALLOCATION_STATE, "shortcuts.safetensors", "shortcuts.json")


def checkpoint(folder: Path, step: int, *files: str, state: str = '{"global_step": 1}') -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_bytes(b"x")
    if state is not None:
        (path / TRAINER_STATE).write_text(state)
    return path


def test_the_newest_complete_checkpoint_is_chosen_and_the_newer_incomplete_ones_named(tmp_path):
    required = ["adapter_model.safetensors", ALLOCATION_STATE]
    complete = checkpoint(tmp_path, 2, *required)
    checkpoint(tmp_path, 4, "adapter_model.safetensors")  # killed before our file: cannot happen any more, but did
    checkpoint(tmp_path, 10, *required, state='{"global_step": 10, "log_hist')  # killed while writing the state
    checkpoint(tmp_path, 12, *required, state=None)  # killed before the state
    (tmp_path / "checkpoint-latest").mkdir()
    chosen, skipped = select_resume_checkpoint(tmp_path, required)
    assert chosen == complete and [p.name for p in skipped] == ["checkpoint-12", "checkpoint-10", "checkpoint-4"]
    assert not is_complete(tmp_path / "checkpoint-4", required) and is_complete(tmp_path / "checkpoint-4", [])

    every = "checkpoint-12, checkpoint-10, checkpoint-4, checkpoint-2 each lack"
    with pytest.raises(UserInputError, match=rf"no complete checkpoint in '.*': {every} .* shortcuts\.json"):
        select_resume_checkpoint(tmp_path, [*required, "shortcuts.json"])
    with pytest.raises(UserInputError, match="no checkpoint-N folder"):
        select_resume_checkpoint(tmp_path / "checkpoint-latest", required)


def test_our_files_are_in_the_checkpoint_before_its_trainer_state_and_before_rotation(
    make_model_dir, tmp_path, monkeypatch
):
    """With save_total_limit 1 the Trainer deletes the previous checkpoint right after writing trainer_state.json:
    by then the new one must hold everything, so a kill at any moment leaves one complete checkpoint."""
    config = hetero_config(make_model_dir("llama"), tmp_path)
    config["shortcuts"] = {"r": 2, "alpha": 4}
    config["training"].update(max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1)
    seen: list[tuple[str, set[str]]] = []
    save_to_json, rotate = TrainerState.save_to_json, transformers.trainer.rotate_checkpoints

    def spy_save(self, json_path):
        seen.append(("state", {p.name for p in Path(json_path).parent.iterdir()}))
        save_to_json(self, json_path)

    def spy_rotate(output_dir, **kwargs):
        newest = max(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        seen.append(("rotation", {p.name for p in newest.iterdir()}))
        rotate(output_dir, **kwargs)

    monkeypatch.setattr(TrainerState, "save_to_json", spy_save)
    monkeypatch.setattr(transformers.trainer, "rotate_checkpoints", spy_rotate)
    out = train(validate_config(config)).output_dir

    assert [event for event, _ in seen] == ["state", "rotation"] * 3
    for event, files in seen:
        assert set(OURS) <= files, (event, files)
        assert (TRAINER_STATE in files) == (event == "rotation")
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]
    assert is_complete(out / "checkpoint-6", OURS)


def write_run(config: dict, folder: Path) -> Path:
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_resume_passes_over_a_checkpoint_a_kill_left_half_written(make_model_dir, tmp_path):
    config = l1ra_config(make_model_dir("llama"), tmp_path)
    config["training"].update(max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2)
    out = train(validate_config(config)).output_dir
    state = out / "checkpoint-6" / TRAINER_STATE
    state.write_text(state.read_text()[:100])  # killed while the Trainer wrote it
    for name in ("adapter_config.json", "adapter_model.safetensors", "ranktune.json"):
        (out / name).unlink()

    result = run_cli("train", str(write_run(config, tmp_path)), "--resume")
    assert result.returncode == 0, result.stderr
    resumed = [line for line in result.stderr.splitlines() if line.startswith("[ranktune] resuming from")]
    assert resumed == [
        f"[ranktune] resuming from {out / 'checkpoint-4'}, the newest complete checkpoint "
        "(checkpoint-6: incomplete, skipped)"
    ]
    assert (out / "adapter_model.safetensors").is_file() and is_complete(out / "checkpoint-6", OURS[:2])


class TouchOnLoad:
    """Unpickling this creates a file: what a crafted checkpoint would do with something worse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_crafted_allocation_state_is_refused_without_running_it(make_model_dir, tmp_path):
    config = l1ra_config(make_model_dir("llama"), tmp_path)
    config["training"].update(max_steps=4, save_strategy="steps", save_steps=2)
    out = train(validate_config(config)).output_dir
    marker = tmp_path / "code-ran"
    crafted = out / "checkpoint-4" / ALLOCATION_STATE
    torch.save({"gate_optimizer": TouchOnLoad(marker)}, crafted)
    torch.load(crafted, weights_only=False)  # the payload works when unpickled without restriction
    assert marker.exists()
    marker.unlink()

    result = run_cli("train", str(write_run(config, tmp_path)), "--resume")
    assert_clean_error(result, 2, str(crafted), "could run code")
    assert not marker.exists()
