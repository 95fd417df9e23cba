"""The TrainerCallback that drives an allocation strategy at optimizer-step boundaries.

`on_optimizer_step` runs after optimizer.step() and before gradients are zeroed (transformers 5: pre-optimizer →
step → on_optimizer_step → scheduler → zero_grad → on_step_end), so decisions never fall inside a
gradient-accumulation window and see synchronized gradients under DDP.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ranktune.adapters.layout import REALLOCATION_HISTORY
from ranktune.allocation.strategy import AllocationStrategy
from ranktune.files import drop_records_after

ALLOCATION_STATE = "allocation_state.pt"


class AllocationCallback(TrainerCallback):
    """Steps the strategy, logs active ranks, writes rank_history.jsonl, and saves / restores its state."""

    def __init__(self, strategy: AllocationStrategy, history_path: Path | None = None) -> None:
        self.strategy = strategy
        self.history_path = history_path
        self.resume_from: str | None = None

    def _record(self, state: TrainerState, record: dict[str, Any]) -> None:
        """Appends to rank_history.jsonl; HeteroLoRA's per-module rows go to reallocation_history.jsonl beside it."""
        if self.history_path is None or not state.is_world_process_zero:
            return
        rows = record.pop("reallocation", [])
        with self.history_path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
        if rows:
            with (self.history_path.parent / REALLOCATION_HISTORY).open("a", encoding="utf-8") as stream:
                stream.writelines(json.dumps(row) + "\n" for row in rows)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        resuming = self.resume_from is not None
        if resuming and self.history_path is not None and state.is_world_process_zero:
            for path in (self.history_path, self.history_path.parent / REALLOCATION_HISTORY):
                drop_records_after(path, state.global_step)
        first = self.strategy.start(state.max_steps, args.get_warmup_steps(state.max_steps), resuming)
        if resuming:
            saved = torch.load(Path(self.resume_from) / ALLOCATION_STATE, map_location="cpu", weights_only=False)
            self.strategy.load_state_dict(saved)
        elif state.global_step == 0:
            self._record(state, first or {"step": 0, **self.strategy.summary()})

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.strategy.before_optimizer_step()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        record = self.strategy.after_optimizer_step(state.global_step + 1, kwargs.get("optimizer"))
        if record is not None:
            self._record(state, record)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            totals = self.strategy.totals()
            logs["active_rank"] = totals["total_rank"]
            logs["active_parameters"] = totals["active_parameters"]

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(self.strategy.state_dict(), folder / ALLOCATION_STATE)
