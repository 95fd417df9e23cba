"""Pruning and reassigning rank components under a budget: a pure plan over gate values, tested by hand."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ranktune.allocation.methods.l1ra import Budget


@dataclass(frozen=True)
class ModuleState:
    """What the plan needs to know about one module: its gates, which components are on, and their cost."""

    name: str
    gates: torch.Tensor  # (capacity,)
    mask: torch.Tensor  # (capacity,) bool
    cost: int  # trainable parameters of one component


@dataclass
class RankPlan:
    """Which components to switch off and on, per module name, and the budget left unspent."""

    pruned: dict[str, list[int]] = field(default_factory=dict)
    added: dict[str, list[int]] = field(default_factory=dict)
    unspent: int = 0


def _prune(module: ModuleState, threshold: float, min_rank: int) -> list[int]:
    """Active components whose gate is at or below the threshold, sparing the strongest to keep min_rank."""
    active = module.mask.nonzero().flatten()
    dead = [int(i) for i in active if float(module.gates[i]) <= threshold]
    keep_back = max(0, min_rank - (len(active) - len(dead)))
    if keep_back:
        dead.sort(key=lambda i: (-float(module.gates[i]), i))  # strongest first, then lowest index
        dead = dead[keep_back:]
    return sorted(dead)


def plan_rank_update(
    modules: list[ModuleState],
    threshold: float,
    min_rank: int,
    reassign: bool,
    exclude_pruned: bool,
    budget: Budget,
    carried: int = 0,
) -> RankPlan:
    """Prunes dead components, then gives the freed budget out one component at a time, round-robin.

    Receivers are ordered by their smallest active gate before pruning, largest first: a module whose weakest
    component is still strongly used wants more capacity. Modules that pruned this round are skipped when
    `exclude_pruned`. With budget "ranks" a component costs 1; with "params" it costs its parameter count, and what
    cannot buy a whole component is carried to the next update (`unspent`).

    Args:
        modules: every gated module, in model order.
        threshold: gates at or below it are dead.
        min_rank: components each module keeps whatever its gates (0 lets a module switch off).
        reassign: give the freed budget to other modules (else it is dropped).
        exclude_pruned: modules that pruned this round receive nothing.
        budget: "ranks" conserves the total rank, "params" the total trainable parameter count.
        carried: budget left unspent by the previous update.
    """
    plan = RankPlan()
    unit = {m.name: 1 if budget == "ranks" else m.cost for m in modules}
    smallest = {}
    for module in modules:
        active = module.mask.nonzero().flatten()
        smallest[module.name] = float(module.gates[active].min()) if len(active) else float("-inf")
        dead = _prune(module, threshold, min_rank)
        if dead:
            plan.pruned[module.name] = dead
    freed = carried + sum(len(dead) * unit[name] for name, dead in plan.pruned.items())
    if not reassign:
        return plan
    free_slots = {}
    for module in modules:
        if exclude_pruned and module.name in plan.pruned:
            continue
        slots = [int(i) for i in (~module.mask).nonzero().flatten()]
        if slots:
            free_slots[module.name] = slots
    order = sorted(free_slots, key=lambda name: -smallest[name])  # stable: ties keep model order
    while True:
        given = False
        for name in order:
            if free_slots[name] and unit[name] <= freed:
                plan.added.setdefault(name, []).append(free_slots[name].pop(0))
                freed -= unit[name]
                given = True
        if not given:
            break
    plan.unspent = freed
    return plan
