"""`transformers.TrainingArguments` from the `training` section, with defaults that suit LoRA runs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from ranktune.config import RunConfig
from ranktune.errors import UserInputError
from ranktune.training.zero import check_deepspeed, deepspeed_requested


def _mixed_precision(user: dict[str, Any]) -> dict[str, bool]:
    """bf16 where the GPU supports it and the user chose no precision; nothing on CPU (slower there, not faster)."""
    if "bf16" in user or "fp16" in user:
        return {}
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return {"bf16": True}
    return {}


def default_training_values(config: RunConfig, has_validation: bool) -> dict[str, Any]:
    """Our defaults; any key the user sets in `training` wins."""
    defaults: dict[str, Any] = {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 2e-4,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "logging_steps": 10,
        "logging_first_step": True,
        "save_strategy": "epoch",
        "save_total_limit": 2,
        "eval_strategy": "epoch" if has_validation else "no",
        "report_to": "none",
        "include_num_input_tokens_seen": "non_padding",
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "train_sampling_strategy": "random" if config.data.packing else "group_by_length",
        "seed": 42,
        "ddp_find_unused_parameters": False,  # static shapes: every parameter takes part in every step
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinning without a GPU only earns a warning
        **_mixed_precision(config.training),
    }
    values = {**defaults, **config.training}
    if config.shortcuts and values.get("gradient_checkpointing"):
        # A shortcut reads another layer's activations; re-entrant checkpointing would cut their gradient path.
        kwargs = dict(values.get("gradient_checkpointing_kwargs") or {})
        if kwargs.get("use_reentrant"):
            raise UserInputError(
                "training.gradient_checkpointing_kwargs.use_reentrant: true cannot train shortcut connections "
                "(they carry activations across layers); leave it out or set it to false"
            )
        values["gradient_checkpointing_kwargs"] = {**kwargs, "use_reentrant": False}
    return values


def build_training_arguments(config: RunConfig, output_dir: Path, has_validation: bool) -> TrainingArguments:
    """Builds TrainingArguments; a value transformers rejects becomes a config error naming the section.

    Raises:
        UserInputError: TrainingArguments refused a combination of values.
    """
    values = default_training_values(config, has_validation)
    if config.data.packing and values.get("use_cache"):
        raise UserInputError(
            "training.use_cache: true with data.packing: the KV cache disables the per-example attention mask "
            "that keeps packed examples apart; drop use_cache or set data.packing: false"
        )
    if deepspeed_requested(values):  # before TrainingArguments, which asks for the deepspeed package first
        values = check_deepspeed(config, values)
    try:
        args = TrainingArguments(output_dir=str(output_dir), **values)
    except (ValueError, TypeError, ImportError) as error:
        raise UserInputError(f"invalid 'training' section: {error}") from None
    check_parallelism(config, args)
    return args


def check_parallelism(config: RunConfig, args: TrainingArguments) -> None:
    """Refuses the FSDP setups ranktune does not run (`training/sharding.py` describes the one it does: FSDP2).

    Raises:
        UserInputError: an FSDP setting `check_plugin` refuses, a quantized base or a trained bias under FSDP.
    """
    if not args.fsdp:
        return
    from accelerate.utils import FullyShardedDataParallelPlugin

    from ranktune.training.sharding import FSDP1_REFUSAL, QUANTIZED_REFUSAL, check_plugin

    if args.fsdp_plugin_args["fsdp_version"] != 2:  # before building accelerate's plugin, which may refuse FSDP1 itself
        raise UserInputError(f"training.fsdp_config: {FSDP1_REFUSAL}")
    try:
        check_plugin(FullyShardedDataParallelPlugin(**args.fsdp_plugin_args))
    except UserInputError as error:
        raise UserInputError(f"training.fsdp_config: {error}") from None
    if config.model.quantization != "none":
        quantization = config.model.quantization
        raise UserInputError(f"model.quantization: '{quantization}' with training.fsdp: {QUANTIZED_REFUSAL}")
    if config.lora.bias != "none":
        raise UserInputError(
            f"lora.bias: '{config.lora.bias}' with training.fsdp is not supported: a trained bias keeps its module's "
            "frozen weight out of FSDP's shards; use lora.bias: none"
        )
    if "LOCAL_RANK" not in os.environ:  # what torchrun and accelerate launch set; the Trainer's own error is vaguer
        raise UserInputError(
            "training.fsdp shards the model across processes: launch them with "
            "`torchrun --nproc_per_node N -m ranktune train ...` or `accelerate launch -m ranktune train ...`"
        )


def validate_training_arguments(config: RunConfig) -> None:
    """Builds the run's TrainingArguments and drops them: what transformers refuses fails before anything loads.

    Building them writes nothing, so output_dir is not touched either. A run always has a validation split
    (`data.load_splits` makes one), hence `has_validation=True`, as in `train`.

    Raises:
        UserInputError: TrainingArguments refused a combination of values.
    """
    build_training_arguments(config, Path(config.output_dir), has_validation=True)
