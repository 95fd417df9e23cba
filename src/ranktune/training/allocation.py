"""Turning the `lora` and `allocation` config sections into a PEFT model, a strategy and the callback driving it."""

from __future__ import annotations

import math
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, TrainingArguments

from ranktune.adapters.layout import RANK_HISTORY
from ranktune.adapters.lora import attach_peft, build_lora_config, check_pattern_keys, lora_layers
from ranktune.adapters.shortcuts import ShortcutSet, bare_model, find_shortcuts, install_shortcuts
from ranktune.allocation.adalora import AdaLoRASettings, AdaLoRAStrategy, build_adalora_config
from ranktune.allocation.callback import AllocationCallback
from ranktune.allocation.components import install_gates
from ranktune.allocation.hetero import HeteroSettings, HeteroStrategy
from ranktune.allocation.l1ra import L1RASettings, L1RAStrategy
from ranktune.allocation.plan import plan_has_shortcuts, planned_lora, planned_shortcuts
from ranktune.allocation.saliency import first_batches
from ranktune.allocation.strategy import AllocationStrategy
from ranktune.config import AdaLoRAAllocation, RunConfig
from ranktune.errors import UserInputError
from ranktune.models.module_settings import apply_module_dropouts, resolve_lora_settings, resolve_shortcut_specs


@dataclass
class AttachedAllocation:
    """What an adaptive-rank run adds to a plain LoRA run."""

    strategy: AllocationStrategy
    callback: AllocationCallback


def steps_per_epoch(args: TrainingArguments, train_rows: int) -> int:
    """Optimizer steps in one epoch, as the Trainer counts them."""
    per_batch = args.per_device_train_batch_size * args.world_size
    batches = train_rows // per_batch if args.dataloader_drop_last else math.ceil(train_rows / per_batch)
    return max(1, math.ceil(batches / args.gradient_accumulation_steps))


def estimate_total_steps(args: TrainingArguments, train_rows: int) -> int:
    """Optimizer steps of the run as the Trainer will count them (it fixes the exact number in `on_train_begin`)."""
    if args.max_steps > 0:
        return args.max_steps
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch(args, train_rows)))


def adalora_settings(allocation: AdaLoRAAllocation, lora_r: int) -> AdaLoRASettings:
    init_r, target_r = allocation.ranks(lora_r)
    knobs = allocation.model_dump(exclude={"method", "init_r", "target_r"})
    return AdaLoRASettings(init_r=init_r, target_r=target_r, **knobs)


def attach_shortcuts(model: PeftModel, config: RunConfig) -> ShortcutSet | None:
    """Installs the `shortcuts` section's connections (as `lora.plan` leaves them) on a LoRA-wrapped model.

    Raises:
        UserInputError: the plan has shortcut entries but the config no `shortcuts` section to install them from.
    """
    if config.shortcuts is None:
        if config.lora.plan and plan_has_shortcuts(config.lora.plan):
            raise UserInputError(
                f"lora.plan '{config.lora.plan}' enables shortcut connections, but the config has no `shortcuts` "
                "section; add the section the scores were computed with"
            )
        return None
    specs = resolve_shortcut_specs(bare_model(model), config.shortcuts)
    if config.lora.plan:
        specs = planned_shortcuts(config.lora.plan, specs)
    return install_shortcuts(model, specs) if specs else None


def attach_configured_lora(
    model: PreTrainedModel, config: RunConfig, gradient_checkpointing: bool = False
) -> PeftModel:
    """LoRA from the `lora` section (its plan and per-module settings applied), then the shortcut connections: the
    candidate pool that training and `ranktune saliency` share.

    Raises:
        UserInputError: targets that match nothing, or a rank_pattern / alpha_pattern key that matches no adapted
            module (a plan replaces those patterns, so they are checked only without one).
    """
    lora_settings, dropouts = resolve_lora_settings(model, planned_lora(config.lora))
    model = attach_peft(model, build_lora_config(lora_settings, config.model.task), gradient_checkpointing)
    if not config.lora.plan:
        check_pattern_keys(config.lora, list(lora_layers(model)))
    apply_module_dropouts(model, dropouts)
    attach_shortcuts(model, config)
    return model


def attach_adapter(
    model: PreTrainedModel,
    config: RunConfig,
    args: TrainingArguments,
    train_dataset: Sized,
    collator: Callable,
    output_dir: Path,
) -> tuple[PeftModel, AttachedAllocation | None]:
    """Wraps the base model with LoRA (or PEFT's AdaLoRA), adds shortcut connections, and sets up the allocation
    strategy, if any. The connections are found again with `adapters.shortcuts.find_shortcuts(model)`.

    Raises:
        UserInputError: targets that match nothing, or an AdaLoRA schedule with no room to reallocate.
    """
    allocation = config.allocation
    checkpointing = bool(args.gradient_checkpointing)
    history = output_dir / RANK_HISTORY
    if allocation.method == "adalora":  # the config refuses plans, per-module settings and shortcuts with AdaLoRA
        settings = adalora_settings(allocation, config.lora.r)
        lora_config = build_lora_config(config.lora, config.model.task)
        adalora_config = build_adalora_config(lora_config, settings, estimate_total_steps(args, len(train_dataset)))
        model = attach_peft(model, adalora_config, checkpointing)
        strategy: AllocationStrategy = AdaLoRAStrategy(model, settings)
        return model, AttachedAllocation(strategy, AllocationCallback(strategy, history))
    model = attach_configured_lora(model, config, checkpointing)
    shortcuts = find_shortcuts(model)
    if allocation.method == "none":
        return model, None
    seed = int(config.training.get("seed", 42))
    if allocation.method == "hetero":
        modules = install_gates(model, 0)  # on/off per module: each keeps its own rank, no reserve capacity
        settings = HeteroSettings(**allocation.model_dump(exclude={"method"}))
        batch_size = args.per_device_train_batch_size
        batches = [] if settings.online else first_batches(train_dataset, collator, batch_size, settings.batches)
        epoch = steps_per_epoch(args, len(train_dataset))
        strategy = HeteroStrategy(model, modules, settings, batches, epoch, seed=seed, shortcuts=shortcuts)
        return model, AttachedAllocation(strategy, AllocationCallback(strategy, history))
    modules = install_gates(model, allocation.max_rank or 2 * config.lora.r)
    settings = L1RASettings(**allocation.model_dump(exclude={"method", "max_rank"}))
    strategy = L1RAStrategy(modules, settings, seed=seed)
    return model, AttachedAllocation(strategy, AllocationCallback(strategy, history))
