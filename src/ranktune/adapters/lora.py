"""Turning the `lora` config section into a PEFT LoRA model."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from ranktune.config import LoraSettings, Task
from ranktune.models.targets import matched_modules

TASK_TYPES = {"causal_lm": TaskType.CAUSAL_LM, "classification": TaskType.SEQ_CLS}


def build_lora_config(settings: LoraSettings, task: Task) -> LoraConfig:
    """Maps our keys onto `peft.LoraConfig`; PEFT adds the classification head to modules_to_save itself."""
    return LoraConfig(
        task_type=TASK_TYPES[task],
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        exclude_modules=settings.exclude_modules,
        use_rslora=settings.rslora,
        use_dora=settings.dora,
        bias=settings.bias,
        rank_pattern=dict(settings.rank_pattern),
        alpha_pattern=dict(settings.alpha_pattern),
        modules_to_save=settings.modules_to_save,
    )


def attach_peft(model: PreTrainedModel, peft_config: LoraConfig, gradient_checkpointing: bool = False) -> PeftModel:
    """Wraps `model` with a LoRA-family adapter (LoRA, AdaLoRA) after checking that the target modules exist.

    Raises:
        UserInputError: `target_modules` matches nothing (the message lists what exists).
    """
    matched_modules(model, peft_config)
    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, peft_config)


def attach_lora(
    model: PreTrainedModel, settings: LoraSettings, task: Task, gradient_checkpointing: bool = False
) -> PeftModel:
    """Wraps `model` with plain LoRA built from the `lora` config section."""
    return attach_peft(model, build_lora_config(settings, task), gradient_checkpointing)
