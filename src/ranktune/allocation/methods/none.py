"""Plain LoRA: every module keeps the rank it was given."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Literal

from ranktune.allocation.registry import (
    AdaptedModel,
    BuildContext,
    Capabilities,
    MethodSettings,
    register_allocation_method,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ranktune.config import RunConfig


class NoAllocation(MethodSettings):
    """Plain LoRA: every module keeps the rank it was given."""

    method: Literal["none"] = "none"


def build(model: PreTrainedModel, config: RunConfig, context: BuildContext) -> AdaptedModel:
    """LoRA (and shortcut connections) as configured; no strategy. With an init that moves part of the base weights
    into the adapter (PiSSA, OLoRA), the adapter at step 0 is kept for the export to subtract."""
    from ranktune.adapters.configured import attach_configured_lora
    from ranktune.adapters.lora import save_initial_adapter

    with warnings.catch_warnings():  # PEFT's advice to convert the adapter: the export does convert it
        warnings.filterwarnings("ignore", message=".*changes the base weights of the model.*")
        peft_model = attach_configured_lora(model, config, context.gradient_checkpointing)
    initial = save_initial_adapter(peft_model) if config.lora.changes_base_weights() else None
    return AdaptedModel(peft_model, initial_adapter=initial)


METHOD = register_allocation_method(
    name="none",
    settings=NoAllocation,
    build=build,
    capabilities=Capabilities(
        shortcuts=True,
        plans=True,
        per_module_settings=True,
        rank_pattern=True,
        dora=True,
        lora_init=True,
        calibration_batches=False,
        moves_ranks="never",
    ),
)
