"""output_dir: nothing of an earlier run is lost when a new one fails, no user file is deleted, one run at a time."""

from __future__ import annotations

import fcntl
import json
import os
import signal
from pathlib import Path

import pytest
from transformers import Trainer

from ranktune.config import validate_config
from ranktune.errors import UserInputError
from ranktune.training import train
from ranktune.training.callbacks import StopOnSignal
from ranktune.training.output_lock import LOCK_FILE, output_dir_lock
from ranktune.training.outputs import RUN_MARKER, EarlierRun, check_output_dir, prepare_output_dir
from tests.training.test_run import text_config


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (lock file aside) and its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (LOCK_FILE, RUN_MARKER)
    }


class Crash(RuntimeError):
    pass


def crash_at_step(monkeypatch, step: int) -> None:
    """Makes the Trainer's training step raise once `step` optimizer steps are done."""
    original = Trainer.training_step

    def failing(self, *args, **kwargs):
        if self.state.global_step >= step:
            raise Crash(f"crash at step {step}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", failing)


@pytest.fixture
def finished_run(make_model_dir, tmp_path):
    """A finished 3-step run in tmp_path/out (with a checkpoint) and its config; returns (config, snapshot)."""
    config = text_config(make_model_dir("llama"), tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    result = train(validate_config(config))
    return config, snapshot(result.output_dir)


def test_overwrite_that_fails_in_training_leaves_the_earlier_run_as_it_was(finished_run, monkeypatch):
    config, before = finished_run
    config["training"].update(max_steps=6, save_strategy="no")
    crash_at_step(monkeypatch, 2)
    with pytest.raises(Crash):
        train(validate_config(config), overwrite=True)
    out = Path(config["output_dir"])
    assert snapshot(out) == before  # adapter, checkpoint, metrics.jsonl and config.yaml of the earlier run
    assert not (out / ".previous-run").exists()


def test_overwrite_that_fails_while_saving_keeps_the_earlier_adapter(finished_run, monkeypatch):
    config, before = finished_run
    from peft import PeftModel

    def broken_save(self, *args, **kwargs):
        raise Crash("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", broken_save)
    config["training"]["save_strategy"] = "no"  # the final save fails, not a checkpoint
    with pytest.raises(Crash):
        train(validate_config(config), overwrite=True)
    assert snapshot(Path(config["output_dir"])) == before  # adapter_config.json was not removed before the save


def test_overwrite_that_finishes_replaces_everything(finished_run):
    config, before = finished_run
    config["training"].update(max_steps=2, save_steps=1)
    out = train(validate_config(config), overwrite=True).output_dir
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2  # the earlier run's rows (up to step 3) are gone, not mixed in
    assert not (out / ".previous-run").exists()
    assert snapshot(out)["adapter_model.safetensors"] != before["adapter_model.safetensors"]


def test_overwrite_that_fails_after_a_checkpoint_can_be_resumed(finished_run, monkeypatch):
    config, before = finished_run
    config["training"].update(max_steps=4, save_steps=2)
    crash_at_step(monkeypatch, 2)
    with pytest.raises(Crash):
        train(validate_config(config), overwrite=True)
    out = Path(config["output_dir"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the new run's, to resume from
    assert (out / "adapter_config.json").read_bytes() == before["adapter_config.json"]  # still the earlier adapter
    assert (out / ".previous-run" / "checkpoint-3").is_dir()  # the earlier run's logs, kept until the new one ends
    monkeypatch.undo()
    train(validate_config(config), resume=True)
    assert not (out / ".previous-run").exists()
    assert json.loads((out / "ranktune.json").read_text())["config"]["training"]["max_steps"] == 4


def test_a_users_file_with_a_report_name_is_never_deleted(tmp_path):
    out = check_output_dir(str(tmp_path / "out"))
    (out / "metrics.jsonl").write_text("my own data\n")
    with pytest.raises(UserInputError, match=r"metrics\.jsonl, which a run writes and which ranktune did not write"):
        prepare_output_dir(out, resume=False, overwrite=False)
    with pytest.raises(UserInputError, match="ranktune did not write"):
        prepare_output_dir(out, resume=False, overwrite=True)
    assert (out / "metrics.jsonl").read_text() == "my own data\n"


def test_a_refused_run_leaves_no_mark_so_a_second_try_is_refused_too(make_model_dir, tmp_path):
    config = text_config(make_model_dir("llama"), tmp_path, max_steps=2)
    out = Path(config["output_dir"])
    out.mkdir()
    (out / "config.yaml").write_bytes(b"my own config\n")
    for _ in range(2):
        with pytest.raises(UserInputError, match="ranktune did not write"):
            train(validate_config(config))
    assert (out / "config.yaml").read_bytes() == b"my own config\n"


def test_a_first_run_that_fails_keeps_its_logs(make_model_dir, tmp_path, monkeypatch):
    config = text_config(make_model_dir("llama"), tmp_path, max_steps=6, logging_steps=1)
    crash_at_step(monkeypatch, 3)
    with pytest.raises(Crash):
        train(validate_config(config))
    out = Path(config["output_dir"])
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and (out / "config.yaml").is_file()  # what it did, to see why it failed
    monkeypatch.undo()
    train(validate_config(config))  # its own leftovers do not block the next try
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [1, 2] and max(steps) == 6 and steps.count(3) == 1


def test_a_signal_after_the_last_step_still_writes_the_adapter(make_model_dir, tmp_path, monkeypatch):
    config = text_config(make_model_dir("llama"), tmp_path, max_steps=2)
    original = StopOnSignal.on_step_end

    def signal_at_the_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            self.received = signal.SIGTERM
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnSignal, "on_step_end", signal_at_the_end)
    result = train(validate_config(config))
    assert (result.output_dir / "adapter_config.json").is_file()


def test_leftovers_of_an_unfinished_run_are_set_aside_then_put_back(tmp_path):
    out = check_output_dir(str(tmp_path / "out"))
    (out / RUN_MARKER).touch()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # a run that failed before its first checkpoint
    prepare_output_dir(out, resume=False, overwrite=False)
    earlier = EarlierRun(out, resume=False)
    earlier.set_aside()
    assert not (out / "metrics.jsonl").exists() and (out / ".previous-run" / "metrics.jsonl").is_file()
    (out / "metrics.jsonl").write_text('{"step": 1, "new": true}\n')
    assert earlier.restore()
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n' and not (out / ".previous-run").exists()


def test_a_set_aside_killed_half_way_is_put_back(tmp_path):
    out = check_output_dir(str(tmp_path / "out"))
    (out / RUN_MARKER).touch()
    (out / "adapter_config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("earlier\n")  # not moved yet when the kill came
    partial = out / ".previous-run.partial"
    (partial / "checkpoint-3").mkdir(parents=True)  # already moved
    prepare_output_dir(out, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        ".ranktune-run",
        "adapter_config.json",
        "checkpoint-3",
        "metrics.jsonl",
    ]


def test_a_save_killed_half_way_leaves_nothing_behind_the_next_run(tmp_path):
    out = check_output_dir(str(tmp_path / "out"))
    (out / RUN_MARKER).touch()
    staging = out / ".ranktune-staging-adapter-k2j4x9"  # what export's staging folder looks like after a SIGKILL
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_bytes(b"partial")
    (out / ".ranktune-staging-metrics.jsonl-a8f3").write_text("partial")  # a rewritten log's temporary file
    (out / ".adapter-v1").mkdir()  # the user's, whatever it looks like
    prepare_output_dir(out, resume=True, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == [".adapter-v1", ".ranktune-run"]


def test_staging_names_in_a_folder_ranktune_never_wrote_are_left_alone(tmp_path):
    out = check_output_dir(str(tmp_path / "out"))
    (out / ".ranktune-staging-notes").write_text("the user's")
    prepare_output_dir(out, resume=False, overwrite=False)
    assert (out / ".ranktune-staging-notes").read_text() == "the user's"


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(UserInputError, match="is a file; expected a folder"):
        check_output_dir(str(tmp_path / "out"))


def test_a_second_run_in_a_locked_output_dir_is_refused(tmp_path):
    out = check_output_dir(str(tmp_path / "out"))
    with output_dir_lock(out):
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        busy = f"in use by another ranktune run \\(pid {os.getpid()}, started"
        with pytest.raises(UserInputError, match=busy), output_dir_lock(out):
            pass
    with output_dir_lock(out):  # released when the block ends
        descriptor = os.open(out / LOCK_FILE, os.O_RDWR)
        with pytest.raises(BlockingIOError):  # an exclusive flock, as another process would see it
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(descriptor)
