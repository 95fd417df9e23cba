"""The output folder of a run: checks before training, the resolved config, and ranktune.json after it."""

from __future__ import annotations

import importlib.metadata
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ranktune.adapters.layout import (
    ADAPTER_CONFIG,
    RANK_HISTORY,
    REALLOCATION_HISTORY,
    RUN_INFO,
    module_totals,
    read_module_ranks,
)
from ranktune.config import RunConfig
from ranktune.errors import UserInputError

RESOLVED_CONFIG = "config.yaml"
METRICS_LOG = "metrics.jsonl"
_PACKAGES = ("ranktune", "torch", "transformers", "peft", "datasets", "accelerate", "trl", "bitsandbytes")


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool, main_process: bool = True) -> Path:
    """Creates output_dir and checks that it is writable and holds nothing a new run would silently mix with.

    A finished adapter or checkpoints of an earlier run are refused unless the user resumes (checkpoints are then
    the point) or overwrites (then they are removed, so neither an old adapter nor an old checkpoint survives).

    Raises:
        UserInputError: not writable, or holds an earlier run's results without --overwrite or --resume.
    """
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserInputError(f"output_dir '{path}' is not writable: {error.strerror or error}") from None
    if resume or not main_process:
        return path
    earlier = [p.name for p in path.glob(f"{PREFIX_CHECKPOINT_DIR}-*")]
    if (path / ADAPTER_CONFIG).exists():
        earlier.insert(0, ADAPTER_CONFIG)
    if earlier and not overwrite:
        raise UserInputError(
            f"output_dir '{path}' holds an earlier run ({', '.join(sorted(earlier)[:3])}); choose another "
            "output_dir, pass --resume to continue it, or --overwrite to replace it"
        )
    for name in (ADAPTER_CONFIG, RUN_INFO, METRICS_LOG, RANK_HISTORY, REALLOCATION_HISTORY):
        (path / name).unlink(missing_ok=True)
    for checkpoint in path.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        shutil.rmtree(checkpoint)
    return path


def save_resolved_config(config: RunConfig, output_dir: Path) -> None:
    """Writes the config with every default filled in, so the run can be repeated exactly."""
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    (output_dir / RESOLVED_CONFIG).write_text(text, encoding="utf-8")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def run_info(adapter_folder: Path, config: RunConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """ranktune.json's content: resolved config, versions, final metrics and the rank of every adapted module."""
    modules = read_module_ranks(adapter_folder)
    return {
        "config": config.model_dump(mode="json"),
        "versions": package_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
        "modules": [module.to_dict() for module in modules],
        **module_totals(modules),
    }
