"""Drop-in trainers for L1RA: `L1RATrainer` (transformers' Trainer) and `L1RASFTTrainer` (TRL's SFTTrainer).

Pass `peft_config=L1RAConfig(...)` as you would a LoraConfig. The trainer wraps the model with LoRA, installs the
gated fixed-capacity components, and drives L1RA with `AllocationCallback`. Checkpoints hold the gates, masks and
L1RA state (written before the Trainer's own files, see `training/checkpoints.py`), so `save_strategy` can stay at
its default and `train(resume_from_checkpoint=...)` continues exactly (`training/reproducible.py`); `True` resumes
from the newest complete checkpoint.
`save_model()` writes the canonical vanilla PEFT adapter (gates folded in, inactive components dropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft import PeftModel, get_peft_model
from transformers import Trainer
from trl import SFTTrainer

from ranktune.adapters.layout import RANK_HISTORY
from ranktune.allocation.callback import AllocationCallback, SynchronizedBeforeClipping
from ranktune.allocation.components import install_gates
from ranktune.allocation.l1ra import L1RAConfig, L1RAStrategy
from ranktune.export import write_adapter
from ranktune.training.checkpoints import CheckpointFilesFirst
from ranktune.training.reproducible import ReproducibleEpochs
from ranktune.training.sharding import WholeAdapterUnderFSDP


def _attach_l1ra(trainer: Trainer, config: L1RAConfig) -> AllocationCallback:
    """Installs gates on the trainer's (already LoRA-wrapped) model and registers the L1RA callback first."""
    modules = install_gates(trainer.model, config.capacity)
    strategy = L1RAStrategy(modules, config.settings(), seed=trainer.args.seed)
    callback = AllocationCallback(strategy, Path(trainer.args.output_dir) / RANK_HISTORY)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def _export(trainer: Trainer, output_dir: str | None) -> None:
    """The final adapter in canonical vanilla PEFT form, written by the main process only."""
    if trainer.is_world_process_zero():
        factors = trainer.l1ra.strategy.folded_factors()
        write_adapter(trainer.model, trainer.processing_class, output_dir or trainer.args.output_dir, factors)


class L1RATrainer(SynchronizedBeforeClipping, WholeAdapterUnderFSDP, CheckpointFilesFirst, ReproducibleEpochs, Trainer):
    """transformers.Trainer with L1RA: `L1RATrainer(model=..., args=..., peft_config=L1RAConfig(...), ...)`."""

    def __init__(self, model: Any = None, *args: Any, peft_config: L1RAConfig, **kwargs: Any) -> None:
        if not isinstance(model, PeftModel):
            model = get_peft_model(model, peft_config.lora_config())
        super().__init__(model, *args, **kwargs)
        self.l1ra = _attach_l1ra(self, peft_config)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call:  # checkpoints keep gates and masks, for an exact resume
            return super().save_model(output_dir, _internal_call)
        return _export(self, output_dir)


class L1RASFTTrainer(
    SynchronizedBeforeClipping, WholeAdapterUnderFSDP, CheckpointFilesFirst, ReproducibleEpochs, SFTTrainer
):
    """trl.SFTTrainer with L1RA: `L1RASFTTrainer(model=..., args=SFTConfig(...), peft_config=L1RAConfig(...))`."""

    def __init__(self, model: Any = None, *args: Any, peft_config: L1RAConfig, **kwargs: Any) -> None:
        super().__init__(model, *args, peft_config=peft_config.lora_config(), **kwargs)
        self.l1ra = _attach_l1ra(self, peft_config)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        return _export(self, output_dir)
