"""AdaLoRA (PEFT's): every module starts at `init_r`; an importance-scored budget shrinks to `target_r` per module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ranktune.allocation.registry import (
    AdaptedModel,
    BuildContext,
    Capabilities,
    MethodSettings,
    StepsOrFraction,
    register_allocation_method,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ranktune.config import LoraSettings, RunConfig


class AdaLoRASettings(MethodSettings):
    """AdaLoRA's knobs under PEFT's names.

    `init_r` and `target_r` default from lora.r so that the final budget equals plain LoRA's: target_r = lora.r and
    init_r = 1.5 × that (PEFT's own 12 → 8). `tinit` / `tfinal` are steps (int) or fractions of the run (float
    below 1).
    """

    method: Literal["adalora"] = "adalora"
    init_r: int | None = Field(default=None, gt=0)
    target_r: int | None = Field(default=None, gt=0)
    tinit: StepsOrFraction = Field(default=0.1, ge=0)
    tfinal: StepsOrFraction = Field(default=0.2, ge=0)
    deltaT: int = Field(default=10, gt=0)
    beta1: float = Field(default=0.85, gt=0.0, lt=1.0)
    beta2: float = Field(default=0.85, gt=0.0, lt=1.0)
    orth_reg_weight: float = Field(default=0.5, ge=0.0)

    def ranks(self, lora_r: int) -> tuple[int, int]:
        """(init_r, target_r) with the defaults filled from lora.r."""
        target_r = self.target_r or lora_r
        return self.init_r or round(1.5 * target_r), target_r

    def with_ranks(self, lora_r: int) -> AdaLoRASettings:
        """These settings with init_r and target_r filled from lora.r where unset."""
        init_r, target_r = self.ranks(lora_r)
        return self.model_copy(update={"init_r": init_r, "target_r": target_r})

    def check_with_lora(self, lora: LoraSettings) -> None:
        init_r, target_r = self.ranks(lora.r)
        if target_r >= init_r:
            raise ValueError(f"allocation.target_r ({target_r}) must be below allocation.init_r ({init_r})")


def build(model: PreTrainedModel, config: RunConfig, context: BuildContext) -> AdaptedModel:
    """PEFT's AdaLoRA layers with the `lora` section's targets, alpha and dropout, and the strategy driving them."""
    from ranktune.adapters.lora import attach_peft, build_lora_config
    from ranktune.allocation.adalora import AdaLoRAStrategy, build_adalora_config

    settings = config.allocation.with_ranks(config.lora.r)
    lora_config = build_lora_config(config.lora, config.model.task)
    adalora_config = build_adalora_config(lora_config, settings, context.total_steps())
    model = attach_peft(model, adalora_config, context.gradient_checkpointing)
    return AdaptedModel(model, AdaLoRAStrategy(model, settings))


METHOD = register_allocation_method(
    name="adalora",
    settings=AdaLoRASettings,
    build=build,
    capabilities=Capabilities(
        shortcuts=False,
        plans=False,
        per_module_settings=False,
        rank_pattern=False,
        dora=False,
        lora_init=False,
        calibration_batches=False,
        moves_ranks="during_training",
    ),
)
