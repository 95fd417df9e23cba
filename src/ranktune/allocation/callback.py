"""The TrainerCallback that drives an allocation strategy at optimizer-step boundaries.

`on_optimizer_step` runs after optimizer.step() and before gradients are zeroed (transformers 5: pre-optimizer →
step → on_optimizer_step → scheduler → zero_grad → on_step_end), so decisions never fall inside a
gradient-accumulation window and see synchronized gradients under DDP.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ranktune.allocation.strategy import AllocationStrategy, HistoryRow
from ranktune.console import progress
from ranktune.errors import UserInputError
from ranktune.files import drop_records_after

ALLOCATION_STATE = "allocation_state.pt"


class AllocationCallback(TrainerCallback):
    """Steps the strategy, logs active ranks, writes rank_history.jsonl, and saves / restores its state.

    It is a `training.checkpoints.CheckpointWriter`: the trainer writes its state into each checkpoint before the
    Trainer's own files.
    """

    checkpoint_files = (ALLOCATION_STATE,)

    def __init__(self, strategy: AllocationStrategy, history_path: Path | None = None) -> None:
        self.strategy = strategy
        self.history_path = history_path
        self.resume_from: str | None = None

    def _history_paths(self) -> list[Path]:
        """rank_history.jsonl and the files of the strategy's own beside it."""
        assert self.history_path is not None
        return [self.history_path, *(self.history_path.parent / name for name in self.strategy.history_files)]

    def _record(self, state: TrainerState, row: HistoryRow) -> None:
        """Appends the row to rank_history.jsonl and its extra rows to the strategy's own files."""
        if self.history_path is None or not state.is_world_process_zero:
            return
        with self.history_path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(row.as_json()) + "\n")
        for name, rows in row.extra_rows.items():
            if name not in self.strategy.history_files:
                raise ValueError(f"{self.strategy.name} wrote rows for {name}, which is not in its history_files")
            with (self.history_path.parent / name).open("a", encoding="utf-8") as stream:
                stream.writelines(json.dumps(extra) + "\n" for extra in rows)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        resuming = self.resume_from is not None
        if resuming and self.history_path is not None and state.is_world_process_zero:
            for path in self._history_paths():
                drop_records_after(path, state.global_step)
        first = self.strategy.start(state.max_steps, args.get_warmup_steps(state.max_steps), resuming)
        if resuming:
            load_allocation_state(self.strategy, Path(self.resume_from) / ALLOCATION_STATE)
        elif state.global_step == 0:
            self._record(state, first or HistoryRow(0, self.strategy.summary()))

    def synchronize_gradients(self) -> None:
        """Called by `SynchronizedBeforeClipping` once a step's gradients are complete, before clipping."""
        self.strategy.synchronize_gradients()

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.strategy.before_optimizer_step()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        record = self.strategy.after_optimizer_step(state.global_step + 1, kwargs.get("optimizer"))
        if record is not None:
            self._record(state, record)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        note = self.strategy.closing_note()
        if note is not None:
            progress(note)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            totals = self.strategy.totals()
            logs["active_rank"] = totals.total_rank
            logs["active_parameters"] = totals.active_parameters

    def write_checkpoint(self, folder: Path) -> None:
        """Saves the strategy's state into a checkpoint folder (called by the trainer before its own files)."""
        partial = folder / f".{ALLOCATION_STATE}.partial"
        torch.save(self.strategy.state_dict(), partial)
        os.replace(partial, folder / ALLOCATION_STATE)


def load_allocation_state(strategy: AllocationStrategy, path: Path) -> None:
    """Restores a strategy's state from a checkpoint, unpickling nothing but tensors, containers and scalars.

    Raises:
        UserInputError: the file is missing, damaged, holds other objects (whose unpickling could run code), or
            is not this strategy's state.
    """
    if not path.is_file():
        raise UserInputError(f"--resume: {path} is missing: the checkpoint was saved without its allocation state")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserInputError(
            f"--resume: {path} holds objects other than tensors, numbers, strings, lists and dicts; "
            "it was not loaded, since unpickling them could run code"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise UserInputError(f"--resume: cannot read {path}: {_one_line(error)}") from None
    try:
        strategy.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserInputError(
            f"--resume: {path} is not the state of this run's {strategy.name} allocation "
            f"({type(error).__name__}: {_one_line(error)})"
        ) from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


class SynchronizedBeforeClipping:
    """Trainer mixin: before the Trainer clips gradients by their global norm, the allocation strategy averages
    the gradients of its own tensors across processes (`AllocationStrategy.synchronize_gradients`). Without it, a
    distributed run whose clipping is active clips each process by a different norm and the processes drift apart.
    Put it before the Trainer class in the bases."""

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, AllocationCallback):
                callback.synchronize_gradients()
        return super()._clip_grad_norm(model)
