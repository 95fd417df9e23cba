"""HeteroLoRA's dynamic search: switch LoRA modules and shortcut connections on and off by saliency during training.

Every LoRA candidate keeps its configured rank for the whole run (gated components with gates fixed at 1); a
disabled module has all its components masked, so its LoRA term is exactly zero. A disabled shortcut connection has
its mask at 0 and adds exactly zero (`adapters/shortcuts.py`). Every `every` optimizer steps the strategy scores the
candidates and enables the top `keep` (floor(keep · N) LoRA modules; shortcuts compete by `shortcuts_mode`, see
`allocation/plan.select`):

- offline (default): the saliency heuristic over `batches` training batches drawn afresh at each reallocation (rows
  at random, seeded by (seed, step)): extra forward/backward passes at each reallocation. With grad_norm and
  `scoring: fresh` (the default) every candidate is scored as a freshly initialised module would score at the model
  as it is (`saliency.fresh_gradient_scores`), so trained and untrained candidates compete on the same terms; with
  `scoring: switched_on` (and the other heuristics) every candidate is switched on and scored with its own factors;
- online: the mean, since the last reallocation, of the heuristic computed from the training gradients themselves
  (grad_norm or snip) relative to the mean over the enabled modules at the same step, at no extra pass. A disabled
  module has no gradient, so it competes with the relative score it had when it was switched off. Until the first
  reallocation every module is on, so every module gets a score.

Disabled modules keep their parameters and optimizer state frozen: their gradients are dropped before the
optimizer step, so the optimizer skips them, and they resume where they were when enabled again. Equal scores are
ordered by a random draw seeded by (seed, step), and scores come from all-reduced gradients, so every distributed
process takes the same decision; every parameter still takes part in every forward pass, so DDP needs no
find_unused_parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from peft import PeftModel

from ranktune.adapters.layout import REALLOCATION_HISTORY
from ranktune.adapters.shortcuts import LowRankShortcut, ShortcutSet
from ranktune.allocation.components import GatedModule
from ranktune.allocation.methods.hetero import HISTORY_FILES, HeteroSettings
from ranktune.allocation.plan import select
from ranktune.allocation.saliency import Batch, gradient_score, score_modules
from ranktune.allocation.strategy import FoldedFactors, HistoryRow, RankSnapshot, Totals


@dataclass(frozen=True)
class ReallocationRow:
    """One candidate at one reallocation: a line of reallocation_history.jsonl."""

    step: int
    module: str
    score: float
    enabled: bool


def reallocation_interval(every: int | float, steps_per_epoch: int) -> int:
    """Optimizer steps between reallocations."""
    if isinstance(every, int):
        return max(1, every)
    return max(1, math.ceil(every * steps_per_epoch))


class HeteroStrategy:
    """Enables the top-scoring fraction of the candidates at every reallocation; masks the rest."""

    name = "hetero"
    history_files = HISTORY_FILES

    def __init__(
        self,
        model: PeftModel,
        modules: list[GatedModule],
        settings: HeteroSettings,
        draw_batches: Callable[[int], list[Batch]],
        steps_per_epoch: int,
        seed: int = 0,
        shortcuts: ShortcutSet | None = None,
    ) -> None:
        self.model = model
        self.modules = {m.name: m for m in modules}
        self.connections: dict[str, LowRankShortcut] = dict(shortcuts.named_connections()) if shortcuts else {}
        self.settings = settings
        self.draw_batches = draw_batches  # step -> the scoring batches of the reallocation at that step
        self.interval = reallocation_interval(settings.every, steps_per_epoch)
        self.seed = seed
        names = [*self.modules, *self.connections]
        select(dict.fromkeys(names, 0.0), settings.keep, settings.shortcuts_mode, seed, key="allocation.keep")
        self.enabled = dict.fromkeys(names, True)
        self.scores = dict.fromkeys(names, 0.0)
        self.online_sums = dict.fromkeys(names, 0.0)
        self.online_counts = dict.fromkeys(names, 0)
        self.selected: list[str] | None = None  # the candidates the last reallocation enabled
        self.changes: list[int] = []  # candidates switched on or off by each reallocation after the first
        self.total_steps = 0

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name in self.modules:
            return self.modules[name].lora_A.weight, self.modules[name].lora_B.weight
        return self.connections[name].A, self.connections[name].B

    def _rank_and_cost(self, name: str) -> tuple[int, int]:
        """Active rank and parameters per rank component."""
        if name in self.modules:
            return self.modules[name].rank, self.modules[name].cost
        connection = self.connections[name]
        return (connection.spec.r if self.enabled[name] else 0), 2 * connection.A.shape[1]

    def start(self, total_steps: int, warmup_steps: int, resuming: bool = False) -> HistoryRow | None:
        """Offline search: the first selection, before the first step. Online search starts with every module on.
        A resumed run takes its selection from the checkpoint instead."""
        self.total_steps = total_steps
        return None if self.settings.online or resuming else self.reallocate(step=0)

    def _set_enabled(self, name: str, enabled: bool) -> None:
        if name in self.modules:
            module = self.modules[name]
            module.lora_A.lora_mask[: module.initial_rank] = enabled  # its planned rank, whatever the capacity
            module.lora_A.refresh()
        else:
            self.connections[name].enabled = enabled
        self.enabled[name] = enabled

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Disabled modules: drops their gradients. Online: accumulates each enabled module's heuristic relative to
        the mean over the enabled modules at this step, so that scores from different steps (gradients shrink as
        training goes on, and clipping rescales them) stay comparable."""
        step_scores = {}
        for name in self.enabled:
            lora_a, lora_b = self._factors(name)
            if not self.enabled[name]:
                lora_a.grad = lora_b.grad = None
            elif self.settings.online and lora_a.grad is not None and lora_b.grad is not None:
                step_scores[name] = float(gradient_score(lora_a, lora_b, snip=self.settings.heuristic == "snip"))
        mean = sum(step_scores.values()) / len(step_scores) if step_scores else 0.0
        if mean > 0:
            for name, score in step_scores.items():
                self.online_sums[name] += score / mean
                self.online_counts[name] += 1

    def _current_scores(self, step: int) -> dict[str, float]:
        if self.settings.online:
            for name in self.enabled:
                if self.online_counts[name]:
                    self.scores[name] = self.online_sums[name] / self.online_counts[name]
                self.online_sums[name], self.online_counts[name] = 0.0, 0
            return dict(self.scores)
        heuristic = self.settings.heuristic
        batches = [] if heuristic == "constant" else self.draw_batches(step)
        if heuristic == "grad_norm" and self.settings.scoring == "fresh":
            self.scores = score_modules(self.model, batches, heuristic, fresh_seed=self.seed)
            return dict(self.scores)
        for name in self.enabled:
            self._set_enabled(name, True)  # score every candidate switched on
        self.scores = score_modules(self.model, batches, heuristic)
        return dict(self.scores)

    def reallocate(self, step: int) -> HistoryRow:
        """Scores the candidates and enables the top `keep`; returns the row for the histories, whose counts say how
        many candidates this reallocation switched on and off (from the second one on)."""
        scores = self._current_scores(step)
        chosen = set(select(scores, self.settings.keep, self.settings.shortcuts_mode, self.seed * 1_000_003 + step))
        for name in self.enabled:
            self._set_enabled(name, name in chosen)
        counts = {}
        if self.selected is not None:
            before = set(self.selected)
            counts = {"switched_on": len(chosen - before), "switched_off": len(before - chosen)}
            self.changes.append(counts["switched_on"] + counts["switched_off"])
        self.selected = sorted(chosen)
        rows = [asdict(ReallocationRow(step, name, scores[name], name in chosen)) for name in self.enabled]
        return HistoryRow(step, self.summary(), counts, extra_rows={REALLOCATION_HISTORY: rows})

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> HistoryRow | None:
        if step % self.interval != 0 or step >= self.total_steps:
            return None
        return self.reallocate(step)

    def closing_note(self) -> str | None:
        """A line for the end of training when the search never changed its selection."""
        if self.changes and not any(self.changes):
            return (
                f"the dynamic search kept the same {len(self.selected or [])} candidates at all "
                f"{len(self.changes) + 1} reallocations: a static plan (`ranktune saliency` + `plan`) trains such an "
                "adapter without the scoring passes"
            )
        return None

    def synchronize_gradients(self) -> None:
        """Nothing of its own: its tensors' gradients are averaged with the adapter's."""

    def totals(self) -> Totals:
        sizes = [self._rank_and_cost(name) for name in self.enabled]
        return Totals(sum(rank for rank, _ in sizes), sum(rank * cost for rank, cost in sizes))

    def summary(self) -> RankSnapshot:
        modules = {
            name: {"rank": self._rank_and_cost(name)[0], "score": self.scores[name], "enabled": self.enabled[name]}
            for name in self.enabled
        }
        return RankSnapshot(self.totals(), modules)

    def folded_factors(self) -> FoldedFactors:
        """Enabled LoRA modules at their full rank; disabled ones are left out of the adapter (they contribute 0).
        Shortcut connections are exported beside the adapter (`adapters/shortcut_files.py`)."""
        return {name: m.folded() for name, m in self.modules.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "enabled": dict(self.enabled),
            "scores": dict(self.scores),
            "online_sums": dict(self.online_sums),
            "online_counts": dict(self.online_counts),
            "selected": self.selected,
            "changes": list(self.changes),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, enabled in state["enabled"].items():
            self._set_enabled(name, enabled)
        self.scores = dict(state["scores"])
        self.online_sums = dict(state["online_sums"])
        self.online_counts = dict(state["online_counts"])
        self.selected, self.changes = state.get("selected"), list(state.get("changes", []))
