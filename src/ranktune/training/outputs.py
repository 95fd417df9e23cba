"""The output folder of a run: checks before training, the resolved config, and ranktune.json after it."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path
from typing import Any

import yaml

from ranktune.adapters.layout import ADAPTER_CONFIG, RUN_INFO, read_module_ranks
from ranktune.config import RunConfig
from ranktune.errors import UserInputError
from ranktune.export import write_json_atomic

RESOLVED_CONFIG = "config.yaml"
METRICS_LOG = "metrics.jsonl"
_PACKAGES = ("ranktune", "torch", "transformers", "peft", "datasets", "accelerate", "trl", "bitsandbytes")


def prepare_output_dir(output_dir: str, resume: bool, overwrite: bool) -> Path:
    """Creates output_dir and checks that it is writable and holds no finished adapter we would silently replace.

    Raises:
        UserInputError: not writable, or already holds an adapter (without --overwrite or --resume).
    """
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserInputError(f"output_dir '{path}' is not writable: {error.strerror or error}") from None
    if (path / ADAPTER_CONFIG).exists() and not (resume or overwrite):
        raise UserInputError(
            f"output_dir '{path}' already holds a trained adapter; choose another output_dir, "
            "or pass --overwrite to replace it"
        )
    if not resume:
        (path / METRICS_LOG).unlink(missing_ok=True)
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


def write_run_info(output_dir: Path, config: RunConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """Writes ranktune.json: resolved config, versions, final metrics and the rank of every adapted module."""
    modules = [module.to_dict() for module in read_module_ranks(output_dir)]
    info = {
        "config": config.model_dump(mode="json"),
        "versions": package_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
        "modules": modules,
        "total_rank": sum(m["rank"] for m in modules),
        "adapter_parameters": sum(m["parameters"] for m in modules),
    }
    write_json_atomic(output_dir / RUN_INFO, info)
    return info
