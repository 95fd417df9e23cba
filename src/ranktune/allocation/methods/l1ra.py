"""L1RA: L1-regularised gates prune rank components and hand the freed budget to modules that need it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ranktune.allocation.methods.gradient import GradientSettings
from ranktune.allocation.registry import (
    AdaptedModel,
    BuildContext,
    Capabilities,
    MethodSettings,
    register_allocation_method,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ranktune.config import LoraSettings, RunConfig


Budget = Literal["ranks", "params"]
"""What a rank update conserves: the total rank, or the total of active rank-component parameters."""


class L1RASettings(MethodSettings):
    """L1RA's knobs, named as in the reference implementation.

    `max_rank` is each module's fixed capacity (default 2 × lora.r): a module can at most double its rank, which
    covers the growth seen in the L1RA paper's runs while keeping the reserved memory to one extra LoRA's worth.

    `start` (ours, not the reference's): where the ranks and factors stand at step 0. None starts every module at
    lora.r with PEFT's init; the gradient method's settings (`start: {method: gradient, rho, init, batches}`) start
    from the ranks and A it chooses before step 0, which the gates then refine during training. Pair it with
    `budget: params`, the quantity the gradient method spends.
    """

    method: Literal["l1ra"] = "l1ra"
    l1ra_lambda: float = Field(default=1e-3, ge=0.0)
    eta_c: float = Field(default=1e-2, gt=0.0)
    rank_update_ratio: float = Field(default=0.1, gt=0.0, le=1.0)
    prune_threshold: float = Field(default=0.0, ge=0.0)
    reassign: bool = True
    exclude_pruned: bool = True
    budget: Budget = "ranks"
    max_rank: int | None = Field(default=None, gt=0)
    min_rank: int = Field(default=1, ge=0)
    start: GradientSettings | None = None

    def capacity(self, lora_r: int) -> int:
        """Each module's fixed number of rank components."""
        return self.max_rank or 2 * lora_r

    def check_with_lora(self, lora: LoraSettings) -> None:
        if self.max_rank is not None and self.max_rank < lora.r:
            raise ValueError(f"allocation.max_rank ({self.max_rank}) must be at least lora.r ({lora.r})")
        if self.start is None:
            return
        if self.start.rho * lora.r > self.capacity(lora.r):
            raise ValueError(
                f"allocation.start.rho ({self.start.rho}) lets a module start above its capacity "
                f"({self.capacity(lora.r)}, allocation.max_rank): lower the one or raise the other"
            )
        keys = ("rank_pattern", "alpha_pattern", "rslora", "plan", "modules", "layers", "reference_config")
        given = [f"lora.{key}" for key in keys if getattr(lora, key)]
        if given:
            raise ValueError(
                f"allocation.start chooses every module's rank and scale from the gradient: remove {', '.join(given)}"
            )


def build(model: PreTrainedModel, config: RunConfig, context: BuildContext) -> AdaptedModel:
    """LoRA as configured, every module gated at its capacity, and the L1RA strategy driving the gates."""
    from ranktune.adapters.configured import attach_configured_lora
    from ranktune.allocation.components import install_gates
    from ranktune.allocation.l1ra import L1RAStrategy

    settings: L1RASettings = config.allocation
    if settings.start is None:
        model = attach_configured_lora(model, config, context.gradient_checkpointing)
    else:
        from ranktune.allocation.gradient import build_gradient_lora

        model = build_gradient_lora(model, config, settings.start, context)
    modules = install_gates(model, settings.capacity(config.lora.r))
    return AdaptedModel(model, L1RAStrategy(modules, settings, seed=context.seed))


METHOD = register_allocation_method(
    name="l1ra",
    settings=L1RASettings,
    build=build,
    capabilities=Capabilities(
        shortcuts=False,
        plans=True,
        per_module_settings=True,
        rank_pattern=True,
        dora=False,
        lora_init=False,
        calibration_batches=True,
        moves_ranks="during_training",
    ),
)
