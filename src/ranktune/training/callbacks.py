"""Trainer callbacks: the metrics.jsonl log with tokens/s, a clean stop on Ctrl-C or SIGTERM, shortcut checkpoints."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ranktune.adapters.layout import SHORTCUTS_CONFIG, SHORTCUTS_WEIGHTS
from ranktune.adapters.shortcut_files import load_shortcut_weights, write_shortcuts
from ranktune.adapters.shortcuts import ShortcutSet
from ranktune.evaluation import perplexity
from ranktune.files import drop_records_after


class MetricsLogger(TrainerCallback):
    """Adds tokens/s (and perplexity for causal LMs) to every log event and appends it to metrics.jsonl.

    Placed first among the callbacks, so the console line shows the added values too.
    """

    def __init__(self, path: Path, causal_lm: bool) -> None:
        self.path = path
        self.causal_lm = causal_lm
        self._last_time: float | None = None
        self._last_tokens = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.global_step > 0 and state.is_world_process_zero:  # resumed: forget what followed the checkpoint
            drop_records_after(self.path, state.global_step)
        self._last_time = time.perf_counter()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if not state.is_world_process_zero or logs is None:
            return
        now = time.perf_counter()
        if "loss" in logs and self._last_time is not None:
            elapsed = now - self._last_time
            tokens = state.num_input_tokens_seen - self._last_tokens
            if elapsed > 0 and tokens > 0:
                logs["tokens_per_second"] = round(tokens / elapsed, 1)
            self._last_time, self._last_tokens = now, state.num_input_tokens_seen
        if self.causal_lm and "eval_loss" in logs:
            logs["eval_perplexity"] = perplexity(logs["eval_loss"])
        record: dict[str, Any] = {"step": state.global_step, "time": time.time(), **logs}
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record, default=float) + "\n")


class StopOnSignal(TrainerCallback):
    """On SIGINT or SIGTERM, finishes the current optimizer step, saves a checkpoint and stops training.

    A second signal interrupts at once (KeyboardInterrupt), for a user who does not want to wait.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None  # the signal this process got
        self.stopped = False  # training stopped for a signal, on this process or (distributed) another
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._any_process_received(args):
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True

    def _any_process_received(self, args: TrainingArguments) -> bool:
        """Whether any process got a signal: under torch.distributed every process stops after the same step (one
        that stopped alone would leave the others waiting in the next step's collectives, and their checkpoint
        would hold two different steps), at the cost of one one-element all-reduce per optimizer step."""
        received = self.received is not None
        if not (dist.is_available() and dist.is_initialized()):
            return received
        flag = torch.tensor([float(received)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """The step's checkpoint is saved: no epoch-end evaluation and no second save into the same folder.

        The Trainer ends the epoch when training stops, and with `eval_strategy` / `save_strategy` "epoch" it would
        evaluate (after the user asked to stop) and rewrite the checkpoint in place, with the RNG state that
        evaluation left (which the uninterrupted run did not have at this step) and open to a second signal.
        """
        if self.stopped:
            control.should_evaluate = False
            control.should_save = False

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Puts the previous handlers back (also when training raised, so a caller's Ctrl-C works again)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class ShortcutCheckpoints(TrainerCallback):
    """Saves the shortcut connections into every checkpoint (the Trainer saves only PEFT's part) and restores them
    when a run resumes.

    Every connection is saved, disabled ones included, so a resumed HeteroLoRA search continues with their trained
    values; their optimizer state is in the Trainer's own optimizer.pt. It is a `training.checkpoints.CheckpointWriter`:
    the trainer writes the files into each checkpoint before the Trainer's own files.
    """

    checkpoint_files = (SHORTCUTS_WEIGHTS, SHORTCUTS_CONFIG)

    def __init__(self, shortcuts: ShortcutSet) -> None:
        self.shortcuts = shortcuts
        self.resume_from: str | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.resume_from is not None:
            load_shortcut_weights(self.shortcuts, Path(self.resume_from))

    def write_checkpoint(self, folder: Path) -> None:
        """Saves every connection into a checkpoint folder (called by the trainer before its own files)."""
        write_shortcuts(self.shortcuts, folder, only_enabled=False)
