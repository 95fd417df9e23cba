"""Gradient: each module's rank and initial A from the full fine-tuning gradient over calibration batches.

Before step 0 the base weights' gradient G (out × in) is averaged over `batches` training batches. Its singular
values say how much of a gradient step a rank-k update of that module can take (Σ of the top k σ²), and a rank of a
module costs in + out parameters, so ranks go greedily to the largest σ² per parameter until the `lora` section's
parameter budget (r on every target) is spent, each module between 1 and rho · r. With `init: gradient` each A
starts as the top right singular vectors of G (B = 0), so the first steps move along the gradient's main directions;
the base weights are left untouched and the adapter exports as plain LoRA on the original base. `init: step` also
sets B, so that the adapter starts as a step down the gradient's top directions (as GoRA's and LoRA-One's inits do):
B·A·scale = -γ G_k, with B where `init_steps` Adam steps down its own gradient would take it (RMS entry
`init_steps` × the learning rate). `rho` 1 keeps uniform ranks (the init alone); `init: lora` keeps PEFT's default
init (the allocation alone).
"""

from __future__ import annotations

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


class GradientSettings(MethodSettings):
    """How many batches the gradient is averaged over, how far a module's rank may rise, and how A and B start.

    `rho`: a module's rank is at most rho · lora.r (1: uniform ranks). `init`: `gradient` (A from the gradient's top
    right singular vectors, at the row norm of PEFT's default init, B = 0), `step` (that A, and B as if
    `init_steps` Adam steps down its gradient had been taken at once) or `lora` (PEFT's default).
    `batches` batches of the global training batch size (per device x processes) are drawn from the start of the
    training data; under DDP they are shared out whole among the processes and their gradients summed, so every
    process takes the same decision, the one a single process would take.
    """

    method: Literal["gradient"] = "gradient"
    rho: float = Field(default=2.0, ge=1.0)
    init: Literal["gradient", "step", "lora"] = "gradient"
    init_steps: float = Field(default=10.0, gt=0.0)
    batches: int = Field(default=8, gt=0)


def build(model: PreTrainedModel, config: RunConfig, context: BuildContext) -> AdaptedModel:
    """The base model's gradient over the first `batches` training batches, then LoRA at the ranks it gives."""
    from ranktune.allocation.fixed_ranks import FixedRanks
    from ranktune.allocation.gradient import build_gradient_lora

    model = build_gradient_lora(model, config, config.allocation, context)
    return AdaptedModel(model, FixedRanks(model, "gradient"))


METHOD = register_allocation_method(
    name="gradient",
    settings=GradientSettings,
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
