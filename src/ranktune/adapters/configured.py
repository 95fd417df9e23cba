"""LoRA and shortcut connections as the `lora` and `shortcuts` sections configure them: the candidate pool that
training and `ranktune saliency` share."""

from __future__ import annotations

from peft import PeftModel
from transformers import PreTrainedModel

from ranktune.adapters.lora import attach_peft, build_lora_config, check_pattern_keys, lora_layers
from ranktune.adapters.shortcuts import ShortcutSet, bare_model, install_shortcuts
from ranktune.config import RunConfig
from ranktune.errors import UserInputError
from ranktune.models.module_settings import apply_module_dropouts, resolve_lora_settings, resolve_shortcut_specs


def attach_shortcuts(model: PeftModel, config: RunConfig) -> ShortcutSet | None:
    """Installs the `shortcuts` section's connections (as `lora.plan` leaves them) on a LoRA-wrapped model.

    Raises:
        UserInputError: the plan has shortcut entries but the config no `shortcuts` section to install them from.
    """
    plan = config.lora.plan_file()
    if config.shortcuts is None:
        if plan is not None and plan.has_shortcuts:
            raise UserInputError(
                f"lora.plan '{config.lora.plan}' enables shortcut connections, but the config has no `shortcuts` "
                "section; add the section the scores were computed with"
            )
        return None
    specs = resolve_shortcut_specs(bare_model(model), config.shortcuts)
    if plan is not None:
        specs = plan.apply_to_shortcuts(specs)
    return install_shortcuts(model, specs) if specs else None


def attach_configured_lora(
    model: PreTrainedModel, config: RunConfig, gradient_checkpointing: bool = False
) -> PeftModel:
    """LoRA from the `lora` section (its plan and per-module settings applied), then the shortcut connections.
    The connections are found again with `adapters.shortcuts.find_shortcuts(model)`.

    Raises:
        UserInputError: targets that match nothing, or a rank_pattern / alpha_pattern key that matches no adapted
            module (a plan replaces those patterns, so they are checked only without one).
    """
    plan = config.lora.plan_file()
    lora = plan.apply_to_lora(config.lora) if plan is not None else config.lora
    lora_settings, dropouts = resolve_lora_settings(model, lora)
    model = attach_peft(model, build_lora_config(lora_settings, config.model.task), gradient_checkpointing)
    if plan is None:
        check_pattern_keys(config.lora, list(lora_layers(model)))
    apply_module_dropouts(model, dropouts)
    attach_shortcuts(model, config)
    return model
