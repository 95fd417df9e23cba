"""Plain LoRA: every module keeps the rank it was given."""

from __future__ import annotations

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
    """LoRA (and shortcut connections) as configured; no strategy."""
    from ranktune.adapters.configured import attach_configured_lora

    return AdaptedModel(attach_configured_lora(model, config, context.gradient_checkpointing))


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
        calibration_batches=False,
        moves_ranks="never",
    ),
)
