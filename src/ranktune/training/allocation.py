"""Turning the `lora` and `allocation` config sections into a PEFT model, a strategy and the callback driving it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, TrainingArguments

from ranktune.adapters.layout import RANK_HISTORY
from ranktune.adapters.lora import attach_peft, build_lora_config
from ranktune.allocation.adalora import AdaLoRASettings, AdaLoRAStrategy, build_adalora_config
from ranktune.allocation.callback import AllocationCallback
from ranktune.allocation.components import install_gates
from ranktune.allocation.l1ra import L1RASettings, L1RAStrategy
from ranktune.allocation.strategy import AllocationStrategy
from ranktune.config import AdaLoRAAllocation, RunConfig


@dataclass
class AttachedAllocation:
    """What an adaptive-rank run adds to a plain LoRA run."""

    strategy: AllocationStrategy
    callback: AllocationCallback


def estimate_total_steps(args: TrainingArguments, train_rows: int) -> int:
    """Optimizer steps of the run as the Trainer will count them (it fixes the exact number in `on_train_begin`)."""
    if args.max_steps > 0:
        return args.max_steps
    per_batch = args.per_device_train_batch_size * args.world_size
    batches = train_rows // per_batch if args.dataloader_drop_last else math.ceil(train_rows / per_batch)
    updates = math.ceil(batches / args.gradient_accumulation_steps)
    return max(1, math.ceil(args.num_train_epochs * updates))


def adalora_settings(allocation: AdaLoRAAllocation, lora_r: int) -> AdaLoRASettings:
    init_r, target_r = allocation.ranks(lora_r)
    knobs = allocation.model_dump(exclude={"method", "init_r", "target_r"})
    return AdaLoRASettings(init_r=init_r, target_r=target_r, **knobs)


def attach_adapter(
    model: PreTrainedModel, config: RunConfig, args: TrainingArguments, train_rows: int, output_dir: Path
) -> tuple[PeftModel, AttachedAllocation | None]:
    """Wraps the base model with LoRA (or PEFT's AdaLoRA) and sets up the allocation strategy, if any.

    Raises:
        UserInputError: targets that match nothing, or an AdaLoRA schedule with no room to reallocate.
    """
    allocation = config.allocation
    lora_config = build_lora_config(config.lora, config.model.task)
    checkpointing = bool(args.gradient_checkpointing)
    history = output_dir / RANK_HISTORY
    if allocation.method == "adalora":
        settings = adalora_settings(allocation, config.lora.r)
        adalora_config = build_adalora_config(lora_config, settings, estimate_total_steps(args, train_rows))
        model = attach_peft(model, adalora_config, checkpointing)
        strategy: AllocationStrategy = AdaLoRAStrategy(model, settings)
        return model, AttachedAllocation(strategy, AllocationCallback(strategy, history))
    model = attach_peft(model, lora_config, checkpointing)
    if allocation.method == "none":
        return model, None
    modules = install_gates(model, allocation.max_rank or 2 * config.lora.r)
    settings = L1RASettings(**allocation.model_dump(exclude={"method", "max_rank"}))
    strategy = L1RAStrategy(modules, settings, seed=int(config.training.get("seed", 42)))
    return model, AttachedAllocation(strategy, AllocationCallback(strategy, history))
