"""The output folder of a run: checks before training, the earlier run set aside, the resolved config, ranktune.json."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from ranktune.adapters.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    RANK_HISTORY,
    RUN_INFO,
    module_totals,
    read_module_ranks,
)
from ranktune.allocation.registry import history_files
from ranktune.config import RunConfig
from ranktune.errors import UserInputError
from ranktune.files import STAGING_PREFIX
from ranktune.training.checkpoints import checkpoints_newest_first, is_complete

RESOLVED_CONFIG = "config.yaml"
METRICS_LOG = "metrics.jsonl"
RUN_MARKER = ".ranktune-run"  # written when a run first writes into output_dir: the report files here are ours
PREVIOUS_RUN = ".previous-run"
_PARTIAL = f"{PREVIOUS_RUN}.partial"  # a set-aside or a put-back that a kill interrupted
_PACKAGES = ("ranktune", "torch", "transformers", "peft", "datasets", "accelerate", "trl", "bitsandbytes")


def run_logs() -> tuple[str, ...]:
    """The files a run writes while it trains: its config and logs, and what the allocation methods record."""
    return (RESOLVED_CONFIG, METRICS_LOG, RANK_HISTORY, *history_files())


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
        handle, probe = tempfile.mkstemp(prefix=STAGING_PREFIX, dir=path)  # a name of its own: processes may race
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise UserInputError(f"output_dir '{path}' is not writable: {error.strerror or error}") from None
    return path


def written_by_ranktune(path: Path) -> bool:
    """Whether a ranktune run has written into output_dir before (its report files are then ours)."""
    return (path / RUN_MARKER).is_file()


def _earlier_results(path: Path) -> list[str]:
    """What a finished or interrupted earlier run left: its adapter, its checkpoints, an unfinished replacement."""
    earlier = [folder.name for folder in checkpoints_newest_first(path)]
    for name in (PREVIOUS_RUN, ADAPTER_CONFIG):
        if (path / name).exists():
            earlier.insert(0, name)
    return earlier


def prepare_output_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Checks that output_dir holds nothing a new run would silently mix with or write over.

    A finished adapter or checkpoints of an earlier run are refused unless the user resumes (checkpoints are then
    the point) or overwrites (then `EarlierRun` sets them aside once training starts). A report file with one of
    our names (metrics.jsonl, config.yaml, ...) in a folder ranktune never wrote into is the user's, and refused.
    In a folder ranktune wrote into, what a kill interrupted is tidied first (`recover_interrupted_writes`). Call it
    with the output_dir lock held, so no other run is writing there.

    Raises:
        UserInputError: an earlier run without --overwrite or --resume, or a file of ours that is not ours.
    """
    ours = written_by_ranktune(path)
    if ours:
        recover_interrupted_writes(path)
    if resume:
        return
    earlier = _earlier_results(path)
    if earlier and not overwrite:
        raise UserInputError(
            f"output_dir '{path}' holds an earlier run ({', '.join(earlier[:3])}); choose another "
            "output_dir, pass --resume to continue it, or --overwrite to replace it"
        )
    if ours or earlier:
        return
    foreign = [name for name in (*run_logs(), RUN_INFO) if (path / name).exists()]
    if foreign:
        raise UserInputError(
            f"output_dir '{path}' holds {', '.join(foreign)}, which a run writes and which ranktune did not write "
            "there; move it away or choose another output_dir"
        )


def recover_interrupted_writes(path: Path) -> None:
    """Tidies what a run killed half-way through a write left in output_dir: staging folders and files (their names
    start with `files.STAGING_PREFIX`), and an earlier run's files caught half-way between output_dir and
    .previous-run (they go back into output_dir)."""
    _remove(sorted(path.glob(f"{STAGING_PREFIX}*")))
    partial = path / _PARTIAL
    if partial.is_dir():
        for item in partial.iterdir():
            os.replace(item, path / item.name)
        partial.rmdir()


class EarlierRun:
    """The earlier run's logs and checkpoints, set aside in output_dir/.previous-run while a new run trains.

    Its adapter stays in place until the new one is written over it (export writes adapter_config.json last), so
    output_dir holds the newest complete adapter throughout, and `.previous-run` the logs that go with it. A finished
    run deletes `.previous-run`. A run that fails before its first complete checkpoint removes its own logs and puts
    the earlier ones back; one that fails or is stopped later keeps both, its checkpoints (to resume) and the earlier
    logs, until it finishes. Every move goes through `.previous-run.partial`, which `recover_interrupted_writes`
    puts back if a kill interrupts it.
    """

    def __init__(self, path: Path, resume: bool, main_process: bool = True) -> None:
        self.path = path
        self.backup = path / PREVIOUS_RUN
        self.replacing = main_process and not resume  # a resumed run continues; it replaces nothing new
        self.main_process = main_process
        self._set_aside = False

    def _run_files(self) -> list[Path]:
        present = [self.path / name for name in run_logs() if (self.path / name).exists()]
        return present + checkpoints_newest_first(self.path)

    def set_aside(self) -> None:
        """Marks output_dir as ranktune's and moves the earlier run's logs and checkpoints into .previous-run (just
        before training starts).

        When .previous-run already exists, an earlier replacement never finished: the adapter in place is still the
        one it describes, and the logs and checkpoints beside it came from the unfinished run, which is discarded.
        """
        if not self.main_process:
            return
        (self.path / RUN_MARKER).touch()
        if not self.replacing:
            return
        self._set_aside = True
        leftovers = self._run_files()
        if self.backup.exists():
            _remove(leftovers)
            return
        if not leftovers:
            return
        partial = self.path / _PARTIAL
        partial.mkdir()
        for item in leftovers:
            os.replace(item, partial / item.name)
        os.replace(partial, self.backup)

    def discard(self) -> None:
        """The run finished and its adapter is written: the earlier logs go (also after a resumed replacement)."""
        if self.main_process and self.backup.exists():
            doomed = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.path))
            os.replace(self.backup, doomed / PREVIOUS_RUN)  # gone from sight at once; a kill leaves staging only
            shutil.rmtree(doomed, ignore_errors=True)

    def restore(self) -> bool:
        """The new run failed. With no complete checkpoint of its own and an earlier run set aside, its logs and
        checkpoint folders go and the earlier ones come back, leaving the folder as it was; otherwise everything
        stays (its checkpoints for `--resume`, its logs to see what happened).

        Returns:
            False when the run's complete checkpoints were kept.
        """
        if not self._set_aside:
            return True
        if any(is_complete(folder, [ADAPTER_WEIGHTS]) for folder in checkpoints_newest_first(self.path)):
            return False
        if not self.backup.is_dir():
            return True
        _remove(self._run_files())
        partial = self.path / _PARTIAL
        os.replace(self.backup, partial)
        recover_interrupted_writes(self.path)
        return True


def _remove(paths: list[Path]) -> None:
    for item in paths:
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
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
