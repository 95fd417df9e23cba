"""HeteroLoRA's static search: saliency scores → a per-module plan (enabled or not, rank); `plan_file` reads the
plan back into a run.

`make_plan` keeps the top floor(keep · N) modules by score; equal scores are ordered by a seeded random draw, so the
same scores and seed always give the same plan. With `redistribute`, the parameter budget of the kept modules at
the pool rank is spread over them in proportion to their scores instead of giving each the pool rank.

Shortcut connections (names ending in residual1, residual2, shortcut1, shortcut2) compete by `shortcuts_mode`:
combined (one pool of floor(keep · N_lora) + round(keep · N_shortcut) slots, raw scores compared), separated (the
top `keep` of each group) or off (only LoRA modules compete; every shortcut stays on).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from ranktune.adapters.shortcut_types import is_shortcut
from ranktune.allocation.plan_file import read_yaml_mapping
from ranktune.errors import UserInputError

SCORES_FORMAT = "ranktune-saliency-1"


def rank_order(scores: dict[str, float], seed: int) -> list[str]:
    """Module names from the highest score to the lowest; ties in a seeded random order."""
    draw = random.Random(seed)
    tie_break = {name: draw.random() for name in sorted(scores)}
    return sorted(scores, key=lambda name: (-scores[name], tie_break[name]))


def keep_counts(lora_count: int, shortcut_count: int, keep: float, mode: str) -> tuple[int, int]:
    """(LoRA slots, shortcut slots) that `keep` grants; "off" keeps every shortcut outside the competition."""
    lora_slots = math.floor(keep * lora_count + 1e-9)  # floor(0.29 · 100) is 28 in floating point
    if mode == "off":
        return lora_slots, shortcut_count
    return lora_slots, round(keep * shortcut_count)


def select(scores: dict[str, float], keep: float, mode: str, seed: int, key: str = "keep") -> list[str]:
    """The enabled candidates, best first: the top `keep` of LoRA modules and shortcuts as `mode` says.

    Args:
        key: how the user set `keep` (`--keep`, `allocation.keep`), for the error message.

    In combined mode at least one LoRA module stays enabled (the best one replaces the last shortcut chosen), so
    the adapter is never empty.

    Raises:
        UserInputError: `keep` enables no LoRA module.
    """
    lora = {name: score for name, score in scores.items() if not is_shortcut(name)}
    shortcuts = {name: score for name, score in scores.items() if is_shortcut(name)}
    lora_slots, shortcut_slots = keep_counts(len(lora), len(shortcuts), keep, mode)
    if lora_slots == 0:
        raise UserInputError(
            f"{key} {keep} of {len(lora)} LoRA modules enables none; the smallest useful {key} is "
            f"{1 / max(len(lora), 1):.4g}"
        )
    if mode == "combined":
        chosen = rank_order(scores, seed)[: lora_slots + shortcut_slots]
        if all(is_shortcut(name) for name in chosen):
            chosen[-1] = rank_order(lora, seed)[0]
        return chosen
    chosen = rank_order(lora, seed)[:lora_slots]
    if mode == "off":
        return chosen + sorted(shortcuts)
    return chosen + rank_order(shortcuts, seed)[:shortcut_slots]


def redistribute_ranks(scores: dict[str, float], costs: dict[str, int], budget: int) -> dict[str, int]:
    """One component per module, then the rest of `budget` in proportion to the scores; Σ rank · cost <= budget.

    Args:
        scores: the kept modules' scores (negative ones count as 0; all zero means equal shares).
        costs: parameters of one rank component per module (in_features + out_features).
        budget: the parameters to spend (at least one component per module).
    """
    weights = {name: max(score, 0.0) for name, score in scores.items()}
    if not any(weights.values()):
        weights = dict.fromkeys(scores, 1.0)
    ranks = dict.fromkeys(scores, 1)
    spent = sum(costs.values())
    share = max(budget - spent, 0) / sum(weights[name] * costs[name] for name in scores)  # components per score
    for name in scores:
        extra = math.floor(weights[name] * share)
        ranks[name] += extra
        spent += extra * costs[name]
    remainders = sorted(scores, key=lambda n: -(weights[n] * share - math.floor(weights[n] * share)))
    for name in remainders:  # the largest rounding loss first, while the budget allows
        if spent + costs[name] <= budget:
            ranks[name] += 1
            spent += costs[name]
    return ranks


def make_plan(
    scores: dict[str, float],
    keep: float,
    rank: int,
    costs: dict[str, int],
    redistribute: bool = False,
    seed: int = 0,
    shortcuts_mode: str = "combined",
    ranks: dict[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """{module: {"enabled": bool, "rank": int, "score": float}} in score order.

    Args:
        ranks: each candidate's pool rank where it differs from `rank` (shortcut connections have their own r).

    Raises:
        UserInputError: `keep` is outside (0, 1] or keeps no module.
    """
    if not 0.0 < keep <= 1.0:
        raise UserInputError(f"--keep must be a fraction in (0, 1], got {keep}")
    order = rank_order(scores, seed)
    kept = select(scores, keep, shortcuts_mode, seed, key="--keep")
    pool = {name: (ranks or {}).get(name, rank) for name in scores}
    chosen = {name: pool[name] for name in kept}
    if redistribute:
        chosen = redistribute_ranks({n: scores[n] for n in kept}, costs, sum(pool[n] * costs[n] for n in kept))
    return {name: {"enabled": name in chosen, "rank": chosen.get(name, 0), "score": scores[name]} for name in order}


def read_scores(path: str | Path) -> dict[str, Any]:
    """Reads a `ranktune saliency` output file.

    Raises:
        UserInputError: missing, malformed or not a saliency file.
    """
    data = read_yaml_mapping(path, "scores file")
    modules = data.get("modules")
    if data.get("format") != SCORES_FORMAT or not isinstance(modules, dict) or not modules:
        raise UserInputError(f"'{path}' is not a `ranktune saliency` output (expected format: {SCORES_FORMAT})")
    return data
