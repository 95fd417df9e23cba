"""The output folder of a run: checks before training, the earlier run set aside, the resolved config, ranktune.json."""

from __future__ import annotations

import importlib.metadata
import os
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
from ranktune.export import STAGING_PREFIX

RESOLVED_CONFIG = "config.yaml"
METRICS_LOG = "metrics.jsonl"
PREVIOUS_RUN = ".previous-run"
RUN_LOGS = (RESOLVED_CONFIG, METRICS_LOG, RANK_HISTORY, REALLOCATION_HISTORY)  # written while a run trains
_STAGING_PREFIXES = (STAGING_PREFIX, *(f".{name}-" for name in RUN_LOGS))  # export's folder, rewritten logs' files
_PACKAGES = ("ranktune", "torch", "transformers", "peft", "datasets", "accelerate", "trl", "bitsandbytes")


def check_output_dir(output_dir: str) -> Path:
    """Creates output_dir when missing and checks that it is a writable folder.

    Raises:
        UserInputError: output_dir is a file, or cannot be created or written.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"output_dir '{path}' is a file; expected a folder (it is created when missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserInputError(f"output_dir '{path}' is not writable: {error.strerror or error}") from None
    return path


def _earlier_results(path: Path) -> list[str]:
    """What a finished or interrupted earlier run left: its adapter, its checkpoints, an unfinished replacement."""
    earlier = sorted(p.name for p in path.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))
    for name in (PREVIOUS_RUN, ADAPTER_CONFIG):
        if (path / name).exists():
            earlier.insert(0, name)
    return earlier


def prepare_output_dir(path: Path, resume: bool, overwrite: bool, written_by_ranktune: bool) -> None:
    """Checks that output_dir holds nothing a new run would silently mix with or write over; deletes nothing.

    A finished adapter or checkpoints of an earlier run are refused unless the user resumes (checkpoints are then
    the point) or overwrites (then `EarlierRun` sets them aside once training starts). A report file with one of
    our names (metrics.jsonl, config.yaml, ...) in a folder ranktune never wrote into is the user's, and refused.
    Also removes the staging folders of a save that a kill interrupted (they are ours by name, and the caller holds
    the output_dir lock, so no other run is writing them).

    Args:
        path: the checked output_dir (`check_output_dir`).
        resume: --resume was given.
        overwrite: --overwrite was given.
        written_by_ranktune: a ranktune run has written into this folder before (its lock file existed).

    Raises:
        UserInputError: an earlier run without --overwrite or --resume, or a file of ours that is not ours.
    """
    remove_interrupted_saves(path)
    if resume:
        return
    earlier = _earlier_results(path)
    if earlier and not overwrite:
        raise UserInputError(
            f"output_dir '{path}' holds an earlier run ({', '.join(earlier[:3])}); choose another "
            "output_dir, pass --resume to continue it, or --overwrite to replace it"
        )
    if written_by_ranktune or earlier:
        return
    foreign = [name for name in (*RUN_LOGS, RUN_INFO) if (path / name).exists()]
    if foreign:
        raise UserInputError(
            f"output_dir '{path}' holds {', '.join(foreign)}, which a run writes and which ranktune did not write "
            "there; move it away or choose another output_dir"
        )


def remove_interrupted_saves(path: Path) -> None:
    """Deletes the hidden staging folders and files that a save killed half-way left in output_dir."""
    for prefix in _STAGING_PREFIXES:
        for staging in path.glob(f"{prefix}*"):
            if staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                staging.unlink(missing_ok=True)


class EarlierRun:
    """The earlier run's logs and checkpoints, set aside in output_dir/.previous-run while a new run trains.

    Its adapter stays in place until the new one is written over it (export writes adapter_config.json last), so
    at every moment output_dir holds the newest complete adapter, and `.previous-run` holds the logs that go with
    it. A finished run deletes `.previous-run`. A run that failed before its first checkpoint removes what it wrote
    and puts the earlier logs back; one that failed or was stopped later keeps both, its checkpoints (to resume)
    and the earlier logs, until it finishes.
    """

    def __init__(self, path: Path, resume: bool, main_process: bool = True) -> None:
        self.path = path
        self.backup = path / PREVIOUS_RUN
        self.replacing = main_process and not resume  # a resumed run continues; it replaces nothing new
        self.main_process = main_process
        self._set_aside = False

    def _new_run_files(self) -> list[Path]:
        present = [self.path / name for name in RUN_LOGS if (self.path / name).exists()]
        return present + sorted(self.path.glob(f"{PREFIX_CHECKPOINT_DIR}-*"))

    def set_aside(self) -> None:
        """Moves the earlier run's logs and checkpoints into .previous-run (just before training starts).

        When .previous-run already exists, an earlier replacement never finished: the adapter in place is still
        the one it describes, and what lies beside it came from the unfinished run, which is discarded.
        """
        if not self.replacing:
            return
        self._set_aside = True
        leftovers = self._new_run_files()
        if self.backup.exists():
            _remove(leftovers)
            return
        if not leftovers:
            return
        self.backup.mkdir()
        for item in leftovers:
            os.replace(item, self.backup / item.name)

    def discard(self) -> None:
        """The run finished and its adapter is written: the earlier logs go (also after a resumed replacement)."""
        if self.main_process:
            shutil.rmtree(self.backup, ignore_errors=True)

    def restore(self) -> bool:
        """The new run failed. With no checkpoint of its own, its logs go and the earlier ones come back, leaving
        the folder as it was; with one, everything stays, so that `--resume` can continue it.

        Returns:
            Whether the folder was put back as it was.
        """
        if not self._set_aside:
            return True
        if any(self.path.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
            return False
        _remove(self._new_run_files())
        if self.backup.is_dir():
            for item in self.backup.iterdir():
                os.replace(item, self.path / item.name)
            self.backup.rmdir()
        return True


def _remove(paths: list[Path]) -> None:
    for item in paths:
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink(missing_ok=True)


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
