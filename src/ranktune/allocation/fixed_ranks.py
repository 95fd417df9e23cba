"""The strategy of a method that sets ranks (and initial factors) before step 0 and leaves them alone after.

It moves nothing during training. It gives such a method what every method has: rank_history.jsonl with the chosen
ranks at step 0 (for `ranktune inspect`), the `active_rank` log values, and the export in canonical form (each
module's scale folded into B, so a heterogeneous adapter loads the same in every engine that reads PEFT's format).
"""

from __future__ import annotations

from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from ranktune.adapters.lora import lora_layers
from ranktune.allocation.strategy import FoldedFactors, HistoryRow, RankSnapshot, Totals


class FixedRanks:
    """The ranks a PEFT LoRA model has, reported and exported; no decision during training."""

    history_files = ()

    def __init__(self, model: PeftModel, name: str) -> None:
        self.name = name
        self.adapter = model.active_adapter
        self.layers: dict[str, LoraLayer] = lora_layers(model)

    def _rank(self, layer: LoraLayer) -> int:
        return int(layer.r[self.adapter])

    def start(self, total_steps: int, warmup_steps: int, resuming: bool = False) -> HistoryRow | None:
        return None

    def before_optimizer_step(self) -> None:
        """Nothing to do: the ranks were fixed before step 0."""

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> HistoryRow | None:
        return None

    def synchronize_gradients(self) -> None:
        """Nothing of its own: its tensors' gradients are averaged with the adapter's."""

    def closing_note(self) -> str | None:
        return None

    def totals(self) -> Totals:
        ranks = [(self._rank(layer), layer.in_features + layer.out_features) for layer in self.layers.values()]
        return Totals(sum(rank for rank, _ in ranks), sum(rank * cost for rank, cost in ranks))

    def summary(self) -> RankSnapshot:
        return RankSnapshot(self.totals(), {name: {"rank": self._rank(layer)} for name, layer in self.layers.items()})

    @torch.no_grad()
    def folded_factors(self) -> FoldedFactors:
        """A (r, in) as trained and B (out, r) times the module's scale (alpha / r, or as the method adjusted it)."""
        factors: FoldedFactors = {}
        for name, layer in self.layers.items():
            lora_a, lora_b = layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight
            scaled_b = lora_b.float() * layer.scaling[self.adapter]  # (out, r)
            factors[name] = (lora_a.detach().clone().contiguous(), scaled_b.to(lora_b.dtype).contiguous())
        return factors

    def state_dict(self) -> dict[str, Any]:
        """Nothing beyond the model's own tensors: a resumed run chooses the same ranks again before loading them."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
