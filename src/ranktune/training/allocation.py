"""Turning the `allocation` config section into gated modules, a strategy and the callback that drives it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel

from ranktune.adapters.layout import RANK_HISTORY
from ranktune.allocation.callback import AllocationCallback
from ranktune.allocation.components import GatedModule, install_gates
from ranktune.allocation.l1ra import L1RASettings, L1RAStrategy
from ranktune.config import RunConfig


@dataclass
class AttachedAllocation:
    """What an adaptive-rank run adds to a plain LoRA run."""

    modules: list[GatedModule]
    strategy: L1RAStrategy
    callback: AllocationCallback


def attach_allocation(model: PeftModel, config: RunConfig, output_dir: Path) -> AttachedAllocation | None:
    """Installs fixed-capacity gated components and the strategy for `config.allocation`; None for plain LoRA."""
    allocation = config.allocation
    if allocation.method == "none":
        return None
    capacity = allocation.max_rank or 2 * config.lora.r
    modules = install_gates(model, capacity)
    settings = L1RASettings(**allocation.model_dump(exclude={"method", "max_rank"}))
    strategy = L1RAStrategy(modules, settings, seed=int(config.training.get("seed", 42)))
    return AttachedAllocation(modules, strategy, AllocationCallback(strategy, output_dir / RANK_HISTORY))
