"""EVA: each module's rank and initial A from the explained variance of its inputs over calibration batches.

The `lora` section gives the budget (r per module, so Σ r over the targets); with `rho` > 1 the ranks are
redistributed towards the modules whose inputs need more components (up to rho · r each), with `rho` 1 only the
initialisation changes. PEFT's own implementation computes it (`peft.initialize_lora_eva_weights`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field

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


class EvaSettings(MethodSettings):
    """EVA's knobs under PEFT's `EvaConfig` names, plus how many training batches to compute them from.

    `tau` is the cosine similarity between two successive estimates at which a component counts as converged;
    `use_label_mask` leaves out the tokens whose label is -100 (prompt and padding) in causal LM data;
    `adjust_scaling_factors` keeps each module's scale alpha / r when its rank changes. `batches` batches of at
    least rho · lora.r rows are drawn from the start of the training data (under DDP, shared out among the processes,
    whose inputs PEFT gathers); PEFT passes over them until every component has converged, at most `max_passes`
    times.
    """

    method: Literal["eva"] = "eva"
    rho: float = Field(default=2.0, ge=1.0)
    tau: float = Field(default=0.99, gt=0.0, le=1.0)
    whiten: bool = False
    use_label_mask: bool = True
    adjust_scaling_factors: bool = True
    batches: int = Field(default=16, gt=0)
    max_passes: int = Field(default=50, gt=0)


def build(model: PreTrainedModel, config: RunConfig, context: BuildContext) -> AdaptedModel:
    """LoRA as configured, then EVA's ranks and initial A from the first `batches` training batches."""
    from ranktune.allocation.eva import attach_eva_lora
    from ranktune.allocation.fixed_ranks import FixedRanks

    settings: EvaSettings = config.allocation
    # A module that sees one vector per row (a classifier's pooler) needs at least rho · r rows in every batch.
    rows = max(context.args.per_device_train_batch_size, math.ceil(settings.rho * config.lora.r))
    batches = context.calibration_batches(settings.batches, batch_size=rows, shard=True)  # PEFT gathers them
    model = attach_eva_lora(model, config, settings, batches, context.gradient_checkpointing)
    return AdaptedModel(model, FixedRanks(model, "eva"))


METHOD = register_allocation_method(
    name="eva",
    settings=EvaSettings,
    build=build,
    capabilities=Capabilities(
        shortcuts=False,
        plans=False,
        per_module_settings=False,
        rank_pattern=False,
        dora=False,
        lora_init=False,
        calibration_batches=True,
        moves_ranks="before_training",
    ),
)
