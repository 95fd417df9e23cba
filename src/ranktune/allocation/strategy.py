"""The interface every allocation strategy (L1RA, AdaLoRA, HeteroLoRA) offers to the callback and the export.

A strategy owns the per-module state that makes ranks move inside fixed-capacity modules. The callback
(`allocation/callback.py`) calls it at optimizer-step boundaries only, so every decision sees complete, synchronized
gradients; the export asks it for each module's folded factors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

FoldedFactors = dict[str, tuple[torch.Tensor, torch.Tensor] | None]
"""Per adapted module (its name in the base model): (A (k, in), B (out, k)) with every gate and scale folded in so
that the module adds x @ A.T @ B.T, or None when the module ended with rank 0."""


@dataclass(frozen=True)
class Totals:
    """Active rank and active trainable parameters over every module; cheap enough for every log event."""

    total_rank: int
    active_parameters: int


@dataclass(frozen=True)
class RankSnapshot:
    """The totals and each module's rank and statistics (gate values, scores: whatever the method keeps)."""

    totals: Totals
    modules: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class HistoryRow:
    """One line of rank_history.jsonl, plus rows for files of the strategy's own (`history_files`).

    Attributes:
        step: The optimizer step after which the ranks are as in `snapshot` (0: before training).
        snapshot: The ranks at that step.
        counts: What the method did at that step (L1RA's pruned / added / unspent, AdaLoRA's budget).
        extra_rows: {file name in output_dir: rows to append}, for the files named in the strategy's
            `history_files` (HeteroLoRA's per-module reallocation_history.jsonl).
    """

    step: int
    snapshot: RankSnapshot
    counts: dict[str, int] = field(default_factory=dict)
    extra_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """The rank_history.jsonl record: step, totals, modules, then the counts."""
        return {"step": self.step, **asdict(self.snapshot.totals), "modules": self.snapshot.modules, **self.counts}


class AllocationStrategy(Protocol):
    """What `AllocationCallback` and the export need from a strategy."""

    name: str
    history_files: tuple[str, ...]
    """Files beside rank_history.jsonl that its `HistoryRow.extra_rows` go to (trimmed like it on resume)."""

    def start(self, total_steps: int, warmup_steps: int, resuming: bool = False) -> HistoryRow | None:
        """Fixes the schedule once the Trainer knows the run length and has built its optimizer; returns a
        history record when it already allocated (HeteroLoRA's first selection). `resuming`: the state will be
        loaded from a checkpoint next."""

    def synchronize_gradients(self) -> None:
        """Averages across processes the gradients of the strategy's own tensors that the distributed wrapper does
        not (L1RA's gates), when the step's gradients are complete and before clipping reads their norm: every
        process then clips by the same norm, as one process with the global batch does."""

    def before_optimizer_step(self) -> None:
        """Runs after gradients are complete (and clipped), before optimizer.step()."""

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> HistoryRow | None:
        """Runs after optimizer.step() and before zero_grad; returns a history row when ranks changed."""

    def closing_note(self) -> str | None:
        """A line the user should read when training ends (a search that never changed its mind), or None."""

    def totals(self) -> Totals:
        """Cheap enough for every log event."""

    def summary(self) -> RankSnapshot:
        """Totals plus each module's rank and statistics."""

    def folded_factors(self) -> FoldedFactors:
        """The vanilla-LoRA factors of every adapted module, for the export."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the model's own tensors, for an exact resume."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
