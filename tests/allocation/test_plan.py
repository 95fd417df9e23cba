"""HeteroLoRA's static plan: exactly floor(keep · N) modules, seeded tie-breaks, score-proportional ranks."""

from __future__ import annotations

import math

import pytest

from ranktune.allocation.plan import make_plan, redistribute_ranks
from ranktune.errors import UserInputError

COSTS = {f"m{i}": 64 for i in range(10)}


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5, 0.99, 1.0])
def test_plan_keeps_exactly_floor_keep_times_n_of_the_highest(keep):
    scores = {f"m{i}": float(i) for i in range(10)}
    plan = make_plan(scores, keep, rank=8, costs=COSTS)
    kept = [name for name, entry in plan.items() if entry["enabled"]]
    assert len(kept) == math.floor(keep * 10)
    assert set(kept) == {f"m{i}" for i in range(10 - len(kept), 10)}
    assert all(entry["rank"] == (8 if entry["enabled"] else 0) for entry in plan.values())


def test_ties_are_broken_by_the_seed_and_only_by_it():
    scores = dict.fromkeys(COSTS, 0.0)  # snip at initialisation: every module ties at 0

    def kept(seed: int) -> list[str]:
        return [name for name, entry in make_plan(scores, 0.3, 8, COSTS, seed=seed).items() if entry["enabled"]]

    assert kept(0) == kept(0) and kept(0) != kept(1) and len(kept(0)) == len(kept(1)) == 3


def test_redistribute_spends_the_same_budget_in_proportion_to_scores():
    scores = {"a": 3.0, "b": 1.0, "c": 0.0}
    costs = {"a": 10, "b": 10, "c": 20}
    ranks = redistribute_ranks(scores, costs, budget=8 * 40)  # three modules at r 8: 320 parameters
    assert ranks["c"] == 1  # at least one component each
    assert sum(ranks[n] * costs[n] for n in ranks) <= 320
    assert 320 - sum(ranks[n] * costs[n] for n in ranks) < min(costs.values())  # nothing affordable left over
    assert ranks == {"a": 22, "b": 8, "c": 1}  # one each, then 280 parameters split 3:1 → 21 and 7 more


def test_keep_that_selects_nothing_is_refused():
    with pytest.raises(UserInputError, match=r"--keep 0\.05 of 10 LoRA modules enables none"):
        make_plan(dict.fromkeys(COSTS, 1.0), 0.05, 8, COSTS)
    with pytest.raises(UserInputError, match=r"--keep must be a fraction in \(0, 1\]"):
        make_plan(dict.fromkeys(COSTS, 1.0), 1.5, 8, COSTS)
