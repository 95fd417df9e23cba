"""Shared check: a run stopped at a checkpoint and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import copy
import json
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from ranktune.config import validate_config
from ranktune.training import train
from ranktune.training.callbacks import StopOnSignal
from ranktune.training.run import TrainingInterrupted

STEPS_PER_EPOCH = 8  # text_config's corpus with data.max_train_samples 2: 32 blocks of 32 tokens, batch 4


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rank_history.jsonl").read_text().splitlines()]


def over_two_epochs(config: dict, dropout: float = 0.1) -> dict:
    """`config` (a text_config) on a training split of STEPS_PER_EPOCH steps, run for two epochs with LoRA dropout:
    a resumed run has to restore the dropout's random numbers and the second epoch's shuffle."""
    config["data"]["max_train_samples"] = 2
    config["lora"]["dropout"] = dropout
    config["training"]["max_steps"] = 2 * STEPS_PER_EPOCH
    return config


def signal_after(step: int) -> type[StopOnSignal]:
    """StopOnSignal that sends its own process a SIGTERM when `step` ends, as `kill` would during that step."""

    class SignalledAfter(StopOnSignal):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                signal.raise_signal(signal.SIGTERM)
            return super().on_step_end(args, state, control, **kwargs)

    return SignalledAfter


def _resume_from(config: dict, step: int) -> None:
    """Deletes the checkpoints after `step` and the final adapter, as if the run had died after that checkpoint,
    and resumes."""
    out = Path(config["output_dir"])
    for folder in out.glob("checkpoint-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    assert (out / f"checkpoint-{step}").is_dir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "ranktune.json", "shortcuts.safetensors"):
        (out / name).unlink(missing_ok=True)
    train(validate_config(config), resume=True)


def _assert_same_result(out: Path, reference_dir: Path, resumed_from: str) -> None:
    """The final ranks and the adapter tensors, shortcut connections included, bit for bit."""
    if (reference_dir / "rank_history.jsonl").is_file():
        assert history(out)[-1]["modules"] == history(reference_dir)[-1]["modules"], resumed_from
    for name in ("adapter_model.safetensors", "shortcuts.safetensors"):
        if not (reference_dir / name).is_file():
            assert not (out / name).is_file()
            continue
        resumed = load_file(str(out / name))
        reference = load_file(str(reference_dir / name))
        assert resumed.keys() == reference.keys()
        for key, tensor in reference.items():
            torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=0, msg=lambda m: f"{resumed_from}: {m}")


def assert_resume_is_exact(
    straight: dict,
    checkpointed: dict,
    save_steps: int,
    resume_steps: Sequence[int],
    stop_after: int | None = None,
) -> Path:
    """Trains `straight`; trains `checkpointed` (the same run in another output_dir) with a checkpoint every
    `save_steps`; then, for each of `resume_steps` (newest first), deletes what followed that checkpoint, resumes,
    and compares the result with the uninterrupted run's.

    With `stop_after`, the same run also trains in a third output_dir with checkpoints at the end of each epoch (our
    default), is stopped by SIGTERM after step `stop_after` (it saves a checkpoint there and exits), resumes, and is
    compared in the same way.

    Returns:
        The uninterrupted run's output folder."""
    reference_dir = train(validate_config(straight)).output_dir
    stopped = copy.deepcopy(checkpointed)
    checkpointed["training"].update(save_strategy="steps", save_steps=save_steps, save_total_limit=None)
    out = train(validate_config(checkpointed)).output_dir
    for step in sorted(resume_steps, reverse=True):
        _resume_from(checkpointed, step)
        _assert_same_result(out, reference_dir, f"resumed from checkpoint-{step}")
    if stop_after is None:
        return reference_dir

    stopped["output_dir"] = f"{stopped['output_dir']}-stopped"
    stopped["training"].update(save_strategy="epoch", save_total_limit=None)
    signalled = mock.patch("ranktune.training.run.StopOnSignal", signal_after(stop_after))
    with signalled, pytest.raises(TrainingInterrupted):
        train(validate_config(stopped))
    out = Path(stopped["output_dir"])
    assert max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == stop_after
    assert not (out / "adapter_model.safetensors").exists()
    saved = json.loads((out / f"checkpoint-{stop_after}" / "trainer_state.json").read_text())
    evaluated = [event for event in saved["log_history"] if "eval_loss" in event and event["step"] == stop_after]
    assert not evaluated, "evaluated and saved again after the stop"
    train(validate_config(stopped), resume=True)
    _assert_same_result(out, reference_dir, f"resumed from checkpoint-{stop_after} saved on SIGTERM")
    return reference_dir


def checkpoint_epoch(out: Path, step: int) -> float:
    """The epoch (fractional) at which a run's checkpoint-`step` was saved."""
    return json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["epoch"]
