"""prune_and_reassign plans against outcomes worked out by hand."""

from __future__ import annotations

import torch

from ranktune.allocation.budget import ModuleState, plan_rank_update


def module(name: str, gates: list[float], active: int, cost: int = 10) -> ModuleState:
    capacity = len(gates)
    return ModuleState(name, torch.tensor(gates), torch.arange(capacity) < active, cost)


def plan(modules, **overrides):
    settings = {"threshold": 0.0, "min_rank": 1, "reassign": True, "exclude_pruned": True, "budget": "ranks"}
    return plan_rank_update(modules, **{**settings, **overrides})


def test_prune_zero_gates_and_reassign_round_robin_by_smallest_gate():
    # a prunes 2 components (gates 0); b's weakest gate is 0.9, c's 0.4: b receives first, then c, then b again.
    modules = [
        module("a", [0.5, 0.0, 0.0, 0.7, 1, 1], active=4),
        module("b", [0.9, 1.0, 1, 1, 1, 1], active=2),
        module("c", [0.4, 0.8, 1, 1, 1, 1], active=2),
    ]
    result = plan(modules)
    assert result.pruned == {"a": [1, 2]}
    assert result.added == {"b": [2], "c": [2]}
    assert result.unspent == 0


def test_total_rank_conserved_and_capacity_respected():
    modules = [module("a", [0.0, 0.0, 0.0, 0.3], active=4), module("b", [1.0, 1.0, 1.0], active=2)]
    result = plan(modules)
    assert result.pruned == {"a": [0, 1, 2]}
    assert result.added == {"b": [2]}  # b has one free slot; a pruned so it is excluded
    assert result.unspent == 2  # what no module could take is reported, not invented


def test_min_rank_keeps_the_strongest_dead_component():
    result = plan([module("a", [0.0, 0.0, 0.0], active=3), module("b", [1.0, 1.0, 1.0, 1.0], active=1)], min_rank=1)
    assert result.pruned == {"a": [1, 2]}  # component 0 survives (ties broken by lowest index)
    assert result.added == {"b": [1, 2]}


def test_min_rank_zero_switches_a_module_off():
    result = plan([module("a", [0.0, 0.0], active=2), module("b", [1.0] * 4, active=2)], min_rank=0)
    assert result.pruned == {"a": [0, 1]} and result.added == {"b": [2, 3]}


def test_exclude_pruned_off_lets_a_pruning_module_receive():
    modules = [module("a", [0.0, 0.9, 1.0], active=2), module("b", [0.5, 1.0], active=2)]
    assert plan(modules, exclude_pruned=False).added == {"a": [2]}  # a slot that was free before pruning
    assert plan(modules, exclude_pruned=True).added == {}


def test_no_reassign_drops_the_freed_rank():
    result = plan([module("a", [0.0, 1.0], active=2), module("b", [1.0, 1.0, 1.0], active=1)], reassign=False)
    assert result.pruned == {"a": [0]} and result.added == {}


def test_params_budget_buys_whole_components_and_carries_the_rest():
    # a frees 2 components of cost 10 = 20 parameters; b's components cost 15 -> one bought, 5 carried over.
    modules = [module("a", [0.0, 0.0, 1.0], active=3, cost=10), module("b", [1.0, 1.0, 1.0, 1.0], active=1, cost=15)]
    result = plan(modules, budget="params")
    assert result.added == {"b": [1]} and result.unspent == 5
    carried = plan([module("b", [1.0, 1.0, 1.0, 1.0], active=2, cost=15)], budget="params", carried=result.unspent + 10)
    assert carried.added == {"b": [2]} and carried.unspent == 0
