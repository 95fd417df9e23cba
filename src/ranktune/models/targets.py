"""Which modules LoRA adapts: PEFT's own matching, checked up front so a miss names what exists."""

from __future__ import annotations

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from ranktune.errors import UserInputError


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(module, (nn.Linear, Conv1D))


def adaptable_modules(model: nn.Module) -> list[str]:
    """Full names of the linear (and GPT-2 Conv1D) modules of a model."""
    return [name for name, module in model.named_modules() if name and _is_linear(module)]


def matched_modules(model: nn.Module, lora_config: LoraConfig) -> list[str]:
    """The module names `lora_config.target_modules` selects, as PEFT will select them.

    `all-linear` is left to PEFT (it knows which output layers to skip), so it is not checked here.

    Raises:
        UserInputError: nothing matches; the message lists the linear module types that do exist.
    """
    if lora_config.target_modules == "all-linear":
        return adaptable_modules(model)
    names = [name for name in adaptable_modules(model) if check_target_module_exists(lora_config, name)]
    if names:
        return names
    kinds = sorted({name.rsplit(".", 1)[-1] for name in adaptable_modules(model)})
    raise UserInputError(
        f"lora.target_modules {lora_config.target_modules!r} matches no linear module of this model; "
        f"linear module names here: {', '.join(kinds)} (or use 'all-linear', a list of names, or a regex)"
    )
