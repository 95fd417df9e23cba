"""L1RA: L1-regularised gates whose zeros free rank components for the modules that use theirs fully.

After every optimizer step the gates take their own Adam step at a constant learning rate `eta_c`, then the true
proximal step of the L1 norm (soft-threshold by eta_c · l1ra_lambda) and a projection onto [0, 1], so unused gates
become exactly 0 whatever optimizer trains A and B. Every `rank_update_ratio` of the run, components whose gate is 0
are switched off and their budget is handed out round-robin (see `budget.plan_rank_update`). A new component starts
with gate 1, a fresh random row of A, a zero column of B (the function is unchanged) and zeroed optimizer state;
every other component keeps its optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from peft import LoraConfig

from ranktune.allocation.budget import ModuleState, RankPlan, plan_rank_update
from ranktune.allocation.components import GatedModule, _init_reserve_rows
from ranktune.allocation.methods.l1ra import Budget, L1RASettings
from ranktune.allocation.strategy import FoldedFactors, HistoryRow, RankSnapshot, Totals

_DEFAULTS = {name: field.default for name, field in L1RASettings.model_fields.items()}


@dataclass
class L1RAConfig(LoraConfig):
    """A `peft.LoraConfig` plus the L1RA knobs: the drop-in config of `L1RATrainer` / `L1RASFTTrainer`.

    The knobs, their defaults and their ranges are `L1RASettings`' (the YAML's `allocation` section); `settings()`
    validates them there. `max_rank` is each module's fixed capacity (default 2 × r). `start` is not among them: the
    drop-in trainers wrap the model with plain LoRA in their constructor, before any training batch exists; a
    gradient start is a `ranktune train` (YAML or Python `RunConfig`) setting.
    """

    yaml_only: ClassVar[frozenset[str]] = frozenset({"start"})  # settings the drop-in trainers do not take

    l1ra_lambda: float = _DEFAULTS["l1ra_lambda"]
    eta_c: float = _DEFAULTS["eta_c"]
    rank_update_ratio: float = _DEFAULTS["rank_update_ratio"]
    prune_threshold: float = _DEFAULTS["prune_threshold"]
    reassign: bool = _DEFAULTS["reassign"]
    exclude_pruned: bool = _DEFAULTS["exclude_pruned"]
    budget: Budget = _DEFAULTS["budget"]
    max_rank: int | None = _DEFAULTS["max_rank"]
    min_rank: int = _DEFAULTS["min_rank"]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.settings()  # the knobs' ranges are checked now, before a trainer wraps any model

    def lora_config(self) -> LoraConfig:
        """The plain LoraConfig part, which PEFT wraps the model with."""
        lora_fields = {f.name for f in fields(LoraConfig) if f.init}
        return LoraConfig(**{k: v for k, v in self.__dict__.items() if k in lora_fields})

    def settings(self) -> L1RASettings:
        """The L1RA knobs, validated as the YAML's are."""
        knobs = set(L1RASettings.model_fields) - {"method"} - self.yaml_only
        return L1RASettings(**{name: getattr(self, name) for name in knobs})

    @property
    def capacity(self) -> int:
        return self.settings().capacity(self.r)


def reset_optimizer_state(optimizer: torch.optim.Optimizer, parameter: torch.Tensor, index: torch.Tensor, dim: int):
    """Zeroes the optimizer state of some rows (dim 0) or columns (dim 1) of a parameter.

    Only float state tensors shaped like the parameter (Adam's moments, SGD's momentum) can be reset per
    component; other layouts (quantized 8-bit, factored Adafactor) keep their state. Returns True when all was reset.
    """
    complete = True
    for value in optimizer.state.get(parameter, {}).values():
        if torch.is_tensor(value) and value.shape == parameter.shape and value.is_floating_point():
            value.index_fill_(dim, index.to(value.device), 0.0)
        elif torch.is_tensor(value) and value.dim() > 0:
            complete = False
    return complete


class L1RAStrategy:
    """Drives the gates of the gated modules: proximal L1 steps every step, prune and reassign on schedule."""

    name = "l1ra"
    history_files = ()

    def __init__(self, modules: list[GatedModule], settings: L1RASettings, seed: int = 0) -> None:
        self.modules = modules
        self.settings = settings
        self.gates = [m.lora_A.lora_gate for m in modules]
        self.gate_optimizer = torch.optim.Adam(self.gates, lr=settings.eta_c)
        self.generator = torch.Generator().manual_seed(seed)
        self._synchronized = False  # the gates' gradients of this step are averaged across processes
        self.unspent = 0
        self.update_every = 1
        self.first_update = 1
        self.total_steps = 0

    def start(self, total_steps: int, warmup_steps: int, resuming: bool = False) -> HistoryRow | None:
        """Switches the gates' gradients on and fixes the rank-update schedule: every ratio · total steps, none at
        step 0 or during warm-up. Called once the Trainer has built its optimizer (which must not hold the gates).
        """
        for gate in self.gates:
            gate.requires_grad_(True)
        self.total_steps = total_steps
        self.update_every = max(1, int(self.settings.rank_update_ratio * total_steps))
        self.first_update = max(self.update_every, warmup_steps)
        return None

    @torch.no_grad()
    def synchronize_gradients(self) -> None:
        """Averages the gates' gradients across processes in one all-reduce. The gates are switched on after the
        distributed wrapper was built, so it does not average them; before clipping reads every gradient's norm,
        they must be the same on every process."""
        if self._synchronized or not (dist.is_available() and dist.is_initialized()):
            return
        grads = [g.grad if g.grad is not None else torch.zeros_like(g) for g in self.gates]
        flat = torch.cat(grads)  # (sum of capacities,)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for gate, grad in zip(self.gates, flat.split([g.numel() for g in self.gates]), strict=True):
            gate.grad = grad.view_as(gate)
        self._synchronized = True

    def before_optimizer_step(self) -> None:
        """Nothing to do: the gates step after the optimizer has stepped A and B."""

    def is_update_step(self, step: int) -> bool:
        return step >= self.first_update and step % self.update_every == 0 and step < self.total_steps

    @torch.no_grad()
    def gate_step(self) -> None:
        """Adam on the gates at a constant rate, then soft-threshold and projection onto [0, 1]."""
        self.synchronize_gradients()  # done already when the trainer clipped gradients
        self._synchronized = False
        for gate in self.gates:
            if gate.grad is None:
                gate.grad = torch.zeros_like(gate)
        self.gate_optimizer.step()
        shrink = self.settings.eta_c * self.settings.l1ra_lambda
        for gate in self.gates:
            gate.copy_(gate.sign() * (gate.abs() - shrink).clamp_min(0.0))
            gate.clamp_(0.0, 1.0)
            gate.grad = None

    def after_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer | None) -> HistoryRow | None:
        """Called after optimizer.step() and before zero_grad; returns a row when ranks were updated."""
        self.gate_step()
        if not self.is_update_step(step):
            return None
        plan = plan_rank_update(
            [ModuleState(m.name, m.lora_A.lora_gate.detach(), m.lora_A.lora_mask, m.cost) for m in self.modules],
            threshold=self.settings.prune_threshold,
            min_rank=self.settings.min_rank,
            reassign=self.settings.reassign,
            exclude_pruned=self.settings.exclude_pruned,
            budget=self.settings.budget,
            carried=self.unspent,
        )
        self.apply(plan, optimizer)
        counts = {"pruned": _count(plan.pruned), "added": _count(plan.added), "unspent": self.unspent}
        return HistoryRow(step, self.summary(), counts)

    @torch.no_grad()
    def apply(self, plan: RankPlan, optimizer: torch.optim.Optimizer | None) -> None:
        """Switches components off and on in place; new ones get gate 1, random A, zero B, zero optimizer state."""
        by_name = {m.name: m for m in self.modules}
        for name, indices in plan.pruned.items():
            module = by_name[name]
            module.lora_A.lora_mask[indices] = False
            module.lora_A.lora_gate[indices] = 0.0
        for name, indices in plan.added.items():
            module = by_name[name]
            index = torch.tensor(indices, dtype=torch.long, device=module.lora_A.weight.device)
            new_rows = module.lora_A.weight.new_empty(len(indices), module.lora_A.in_features)
            _init_reserve_rows(new_rows, 0, self.generator)
            module.lora_A.weight[index] = new_rows
            module.lora_B.weight[:, index] = 0.0
            module.lora_A.lora_gate[index] = 1.0
            module.lora_A.lora_mask[index] = True
            if optimizer is not None:
                reset_optimizer_state(optimizer, module.lora_A.weight, index, dim=0)
                reset_optimizer_state(optimizer, module.lora_B.weight, index, dim=1)
            reset_optimizer_state(self.gate_optimizer, module.lora_A.lora_gate, index, dim=0)
        for name in set(plan.pruned) | set(plan.added):
            by_name[name].lora_A.refresh()
        self.unspent = plan.unspent

    def closing_note(self) -> str | None:
        return None

    def totals(self) -> Totals:
        """From the cached ranks (no tensor work)."""
        return Totals(sum(m.rank for m in self.modules), sum(m.rank * m.cost for m in self.modules))

    def summary(self) -> RankSnapshot:
        """Per-module rank and gate statistics, plus totals."""
        modules = {}
        for m in self.modules:
            active = m.lora_A.lora_gate.detach()[m.lora_A.active_index]
            stats = {"rank": m.rank}
            if len(active):
                stats.update(gate_min=float(active.min()), gate_mean=float(active.mean()), gate_max=float(active.max()))
            modules[m.name] = stats
        return RankSnapshot(self.totals(), modules)

    def folded_factors(self) -> FoldedFactors:
        return {m.name: m.folded() for m in self.modules}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the model tensors (gates and masks travel with the adapter weights)."""
        return {
            "settings": self.settings.model_dump(exclude={"method", "max_rank"}),
            "gate_optimizer": self.gate_optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "unspent": self.unspent,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gate_optimizer.load_state_dict(state["gate_optimizer"])
        self.generator.set_state(state["generator"])
        self.unspent = int(state["unspent"])
        for module in self.modules:
            module.lora_A.refresh()


def _count(per_module: dict[str, list[int]]) -> int:
    return sum(len(v) for v in per_module.values())
