"""The interface every allocation strategy (L1RA, AdaLoRA, HeteroLoRA) offers to the callback and the export.

A strategy owns the per-module state that makes ranks move inside fixed-capacity modules. The callback
(`allocation/callback.py`) calls it at optimizer-step boundaries only, so every decision sees complete, synchronized
gradients; the export asks it for each module's folded factors.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

FoldedFactors = dict[str, tuple[torch.Tensor, torch.Tensor] | None]
"""Per adapted module (its name in the base model): (A (k, in), B (out, k)) with every gate and scale folded in so
that the module adds x @ A.T @ B.T, or None when the module ended with rank 0."""


class AllocationStrategy(Protocol):
    """What `AllocationCallback` and the export need from a strategy."""

    name: str

    def start(self, total_steps: int, warmup_steps: int, resuming: bool = False) -> dict[str, Any] | None:
        """Fixes the schedule once the Trainer knows the run length and has built its optimizer; returns a
        history record when it already allocated (HeteroLoRA's first selection). `resuming`: the state will be
        loaded from a checkpoint next."""

    def before_optimizer_step(self) -> None:
        """Runs after gradients are complete (and clipped), before optimizer.step()."""

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
        """Runs after optimizer.step() and before zero_grad; returns a rank_history record when ranks changed."""

    def totals(self) -> dict[str, int]:
        """{"total_rank": ..., "active_parameters": ...}, cheap enough for every log event."""

    def summary(self) -> dict[str, Any]:
        """Totals plus {"modules": {name: {"rank": ..., gate statistics}}}."""

    def folded_factors(self) -> FoldedFactors:
        """The vanilla-LoRA factors of every adapted module, for the export."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the model's own tensors, for an exact resume."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
