"""HeteroLoRA's dynamic search: every `every` steps, score the LoRA modules and enable the top `keep` fraction."""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from ranktune.adapters.layout import REALLOCATION_HISTORY
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

    from ranktune.config import RunConfig

HISTORY_FILES = (REALLOCATION_HISTORY,)  # one row per candidate and reallocation: its score and whether it is on
Heuristic = Literal["constant", "grad_norm", "snip", "synflow", "alpha_test"]
HEURISTICS: tuple[str, ...] = typing.get_args(Heuristic)


class HeteroSettings(MethodSettings):
    """The dynamic search's knobs.

    `every` is a fraction of an epoch (float below 1) or a number of optimizer steps (int). `online: true` scores
    from the training gradients themselves (grad_norm or snip) instead of `batches` extra forward/backward passes,
    which are drawn afresh from the training set at every reallocation. `scoring` says how offline grad_norm treats
    candidates that have trained: `fresh` scores each as a freshly initialised module would score at the model as it
    is (its own factors take no part, so enabled and disabled candidates compete on the same terms); `switched_on`
    switches every candidate on and scores its own factors, which favours the modules already enabled (their trained
    B gives them a ∂L/∂A that a disabled module at B = 0 lacks).
    """

    method: Literal["hetero"] = "hetero"
    heuristic: Heuristic = "grad_norm"
    every: StepsOrFraction = Field(default=0.2, gt=0)
    keep: float = Field(default=0.25, gt=0.0, le=1.0)
    batches: int = Field(default=32, gt=0)
    online: bool = False
    shortcuts_mode: Literal["combined", "separated", "off"] = "combined"
    scoring: Literal["fresh", "switched_on"] = "fresh"

    @model_validator(mode="after")
    def _online_needs_gradients(self) -> HeteroSettings:
        if self.online and self.heuristic not in ("grad_norm", "snip"):
            raise ValueError(
                f"online scoring uses the training gradients: heuristic grad_norm or snip, not {self.heuristic}"
            )
        if self.heuristic == "snip" and not self.online:
            raise ValueError(
                "offline snip scores every module whose B has never trained exactly 0 (B starts at 0), so the "
                "first selection would be random and the modules it leaves out would never be chosen; use "
                "online: true with snip, or another heuristic"
            )
        if "scoring" in self.model_fields_set and (self.online or self.heuristic != "grad_norm"):
            raise ValueError(
                "scoring chooses how offline grad_norm treats trained candidates; with online scoring or another "
                "heuristic it has no effect: remove it"
            )
        return self


def build(model: PreTrainedModel, config: RunConfig, context: BuildContext) -> AdaptedModel:
    """LoRA and shortcut connections as configured, each LoRA module gated on/off at its own rank (no reserve
    capacity), and the search over them; offline scoring draws `batches` training batches at each reallocation."""
    from ranktune.adapters.configured import attach_configured_lora
    from ranktune.adapters.shortcuts import find_shortcuts
    from ranktune.allocation.components import install_gates
    from ranktune.allocation.hetero import HeteroStrategy

    settings: HeteroSettings = config.allocation
    model = attach_configured_lora(model, config, context.gradient_checkpointing)
    modules = install_gates(model, 0)

    def draw_batches(step: int) -> list:
        return context.sampled_batches(settings.batches, draw=step)

    strategy = HeteroStrategy(
        model, modules, settings, draw_batches, context.steps_per_epoch(), context.seed, find_shortcuts(model)
    )
    return AdaptedModel(model, strategy)


METHOD = register_allocation_method(
    name="hetero",
    settings=HeteroSettings,
    build=build,
    capabilities=Capabilities(
        shortcuts=True,
        plans=True,
        per_module_settings=True,
        rank_pattern=True,
        dora=False,
        lora_init=False,
        calibration_batches=True,
        moves_ranks="during_training",
    ),
    history_files=HISTORY_FILES,
)
