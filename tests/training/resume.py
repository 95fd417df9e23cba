"""Shared check: a run interrupted after a checkpoint and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ranktune.config import validate_config
from ranktune.training import train


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rank_history.jsonl").read_text().splitlines()]


def assert_resume_is_exact(straight: dict, checkpointed: dict, save_steps: int, max_steps: int) -> Path:
    """Trains `straight`; trains `checkpointed` (same run, other output_dir) with a checkpoint every `save_steps`,
    deletes the final checkpoint and adapter as if the run died after the checkpoint at `save_steps`, resumes, and
    compares the final ranks (exactly) and the adapter tensors, shortcut connections included (to 1e-6).

    Returns:
        The uninterrupted run's output folder."""
    reference_dir = train(validate_config(straight)).output_dir
    checkpointed["training"].update(save_strategy="steps", save_steps=save_steps)
    out = train(validate_config(checkpointed)).output_dir
    shutil.rmtree(out / f"checkpoint-{max_steps}")
    for name in ("adapter_config.json", "adapter_model.safetensors", "ranktune.json", "shortcuts.safetensors"):
        (out / name).unlink(missing_ok=True)
    train(validate_config(checkpointed), resume=True)

    assert history(out)[-1]["modules"] == history(reference_dir)[-1]["modules"]
    for name in ("adapter_model.safetensors", "shortcuts.safetensors"):
        if not (reference_dir / name).is_file():
            assert not (out / name).is_file()
            continue
        resumed = load_file(str(out / name))
        reference = load_file(str(reference_dir / name))
        assert resumed.keys() == reference.keys()
        for key, tensor in reference.items():
            torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=1e-6)
    return reference_dir
