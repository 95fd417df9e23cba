"""Checkpoints that are complete or recognisably incomplete, and resuming from the newest complete one.

The Trainer writes a checkpoint's files one after the other, trainer_state.json last, and then deletes older
checkpoints (`save_total_limit`). Our own files (the allocation state, the shortcut connections) written in a
callback's `on_save` would come after that rotation, so a run killed in between would leave only a checkpoint
without them. They are written into the folder first instead, so a trainer_state.json that parses marks a folder in
which everything was written, and the previous checkpoint is deleted only after that. `--resume` takes the newest
complete checkpoint and passes over any newer one a kill left half-written (the Trainer would stop at it: "Can't
find a valid checkpoint").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ranktune.adapters.layout import ADAPTER_WEIGHTS
from ranktune.errors import UserInputError

TRAINER_STATE = TRAINER_STATE_NAME  # the last file the Trainer writes into a checkpoint


@runtime_checkable
class CheckpointWriter(Protocol):
    """A Trainer callback that keeps files of its own in every checkpoint, and reads them back on resume."""

    checkpoint_files: tuple[str, ...]
    resume_from: str | None
    """The checkpoint folder the run resumes from (set by the trainer's `train`), else None."""

    def write_checkpoint(self, folder: Path) -> None:
        """Writes `checkpoint_files` into the checkpoint `folder`."""


class CheckpointFilesFirst:
    """Trainer mixin: writes the files of the callbacks that are `CheckpointWriter`s into each checkpoint folder
    before the Trainer's own files (trainer_state.json last) and before it rotates older checkpoints.

    Put it before the Trainer class in the bases: `class T(CheckpointFilesFirst, Trainer)`.
    """

    def checkpoint_writers(self) -> list[CheckpointWriter]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, CheckpointWriter)]

    def checkpoint_files(self) -> list[str]:
        """Files a complete checkpoint holds besides trainer_state.json: the adapter weights and the writers' files."""
        return [ADAPTER_WEIGHTS, *(name for writer in self.checkpoint_writers() for name in writer.checkpoint_files)]

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None, **kwargs: Any) -> Any:
        """Trains, from a checkpoint folder if given; `True` means the newest complete one in output_dir (a kill can
        leave a newer one half-written). Every writer is told the folder it reads its files from (None: a fresh
        start, also after an earlier resumed `train`)."""
        checkpoint = None
        if resume_from_checkpoint is True:
            checkpoint = str(select_resume_checkpoint(Path(self.args.output_dir), self.checkpoint_files())[0])
        elif resume_from_checkpoint:
            checkpoint = os.fspath(resume_from_checkpoint)
        for writer in self.checkpoint_writers():
            writer.resume_from = checkpoint
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / TRAINER_STATE).unlink(missing_ok=True)  # a folder saved again is incomplete until rewritten
            for writer in self.checkpoint_writers():
                writer.write_checkpoint(folder)
        super()._save_checkpoint(model, trial)


def checkpoint_step(folder: Path) -> int | None:
    """N of a `checkpoint-N` folder name, else None."""
    prefix, _, step = folder.name.partition("-")
    return int(step) if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() else None


def checkpoints_newest_first(output_dir: Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, highest N first."""
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if path.is_dir() and checkpoint_step(path) is not None]
    return sorted(found, key=lambda path: checkpoint_step(path) or 0, reverse=True)


def is_complete(folder: Path, required: Iterable[str]) -> bool:
    """Whether the Trainer finished the checkpoint (its trainer_state.json, written last, parses) and `required`
    files are all there."""
    try:
        state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state and all((folder / name).is_file() for name in required)


def select_resume_checkpoint(output_dir: Path, required: Iterable[str]) -> tuple[Path, list[Path]]:
    """The newest complete checkpoint of `output_dir`, and the newer incomplete ones passed over.

    Raises:
        UserInputError: no checkpoint-N folder, or none complete.
    """
    required = list(required)
    skipped = []
    for folder in checkpoints_newest_first(output_dir):
        if is_complete(folder, required):
            return folder, skipped
        skipped.append(folder)
    if not skipped:
        raise UserInputError(f"--resume: no checkpoint-N folder in '{output_dir}' to resume from")
    raise UserInputError(
        f"--resume: no complete checkpoint in '{output_dir}': {_names(skipped)} each lack a readable {TRAINER_STATE} "
        f"or one of {', '.join(required)} (a run killed while saving, or a checkpoint of another configuration)"
    )


def resume_message(chosen: Path, skipped: list[Path]) -> str:
    """The console line that says which checkpoint a run resumes from, and which newer ones it passed over."""
    if not skipped:
        return f"resuming from {chosen}"
    return f"resuming from {chosen}, the newest complete checkpoint ({_names(skipped)}: incomplete, skipped)"


def _names(folders: list[Path]) -> str:
    return ", ".join(folder.name for folder in folders)
