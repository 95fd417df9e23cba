"""The report's arithmetic against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from benchmarks.quality_report import compare, headline, mean_std, task_table
from benchmarks.quality_study import Task


def test_mean_and_sample_standard_deviation():
    mean, std = mean_std([0.78, 0.80, 0.82])
    assert mean == pytest.approx(0.80)
    assert std == pytest.approx(0.02)  # sqrt((0.02² + 0 + 0.02²) / 2)
    assert mean_std([0.5]) == (0.5, 0.0)


def _row(mean: float, std: float, seeds: int = 3) -> dict:
    return {"test": (mean, std), "seeds": list(range(seeds))}


def test_a_gain_within_two_standard_errors_is_not_told_from_noise():
    found = compare(_row(0.80, 0.01), _row(0.78, 0.02), higher_is_better=True)
    assert found["gain"] == pytest.approx(0.02)
    assert found["error"] == pytest.approx(math.sqrt(0.01**2 / 3 + 0.02**2 / 3))  # 0.0129
    assert found["verdict"] == "within 2 SE"  # 0.02 <= 2 x 0.0129


def test_lower_is_better_for_a_loss():
    better = compare(_row(1.50, 0.01), _row(1.60, 0.01), higher_is_better=False)
    assert better["gain"] == pytest.approx(0.10) and better["verdict"] == "ahead by > 2 SE"
    worse = compare(_row(1.70, 0.01), _row(1.60, 0.01), higher_is_better=False)
    assert worse["gain"] == pytest.approx(-0.10) and worse["verdict"] == "behind by > 2 SE"


def _summary(method: str, label: str, test: tuple[float, float], parameters: float, seconds: float,
             lora_r: int | None = None) -> dict:  # fmt: skip
    return {"method": method, "label": label, "lora_r": lora_r, "test": test, "second": (0.0, 0.0), "seeds": [0, 1, 2],
            "adapter_parameters": (parameters, 0.0), "trained_parameters": 2 * parameters, "ranks": "37 × r 8",
            "first_seed_shortcuts": 0, "train_seconds": (seconds, 0.0), "wall_seconds": (seconds + 10, 0.0),
            "study_seconds": 600.0, "chosen": {"learning_rate": 0.001, "knob": "allocation.l1ra_lambda",
                                               "knob_value": 0.3}}  # fmt: skip


def test_a_lower_loss_is_a_positive_gain_in_the_table_and_the_headline():
    task = Task("lm", "a causal task", {}, {}, {}, (1e-3,), metric="loss", higher_is_better=False,
                second_metric="perplexity")  # fmt: skip
    rows = [
        _summary("lora-r8", "LoRA r 8", (2.00, 0.01), 1000, 20, lora_r=8),
        _summary("l1ra-ranks", "L1RA", (1.90, 0.01), 1100, 30),
    ]
    rows[1]["ranks"] = "37 × r 2–16"
    baseline = {"loss": 2.5, "perplexity": 12.2, "label": "the base model"}
    table = task_table(task, rows, baseline)
    assert table[0].startswith("| method |") and "test loss (lower is better)" in table[0]
    assert table[2] == "| the base model | 0 | 0 | — | — | 2.5000 | 12.2000 | — | — | — | — |"
    assert "| +0.1000 ± 0.0082 (ahead by > 2 SE) |" in table[4]  # sqrt(0.01²/3 · 2) = 0.0082
    lines = headline(task, rows, baseline)
    assert lines[0] == "- Best mean test loss: L1RA (1.9000 ± 0.0100)."
    assert lines[1] == "- Ahead of LoRA r 8 by more than 2 SE: L1RA."
    assert lines[2] == (
        "- L1RA, with 1.10x the adapter parameters of LoRA r 8 and 1.33x its time per run (search included): "
        "loss gain +0.1000 ± 0.0082, ahead by > 2 SE."
    )  # 40 s against 30 s per run


def test_a_method_no_better_than_the_baseline_is_said_not_to_have_learned_and_unmoved_ranks_are_named():
    task = Task("cls", "a classifier", {}, {}, {}, (1e-3,), metric="accuracy", higher_is_better=True,
                second_metric="macro_f1")  # fmt: skip
    rows = [
        _summary("lora-r8", "LoRA r 8", (0.80, 0.01), 1000, 20, lora_r=8),
        _summary("adalora", "AdaLoRA", (0.57, 0.0), 900, 20),
        _summary("l1ra-ranks", "L1RA", (0.80, 0.01), 1000, 20),  # the same "37 × r 8" as LoRA r 8
    ]
    lines = headline(task, rows, {"accuracy": 0.57, "macro_f1": 0.36, "label": "always 'fresh'"})
    assert lines[1] == "- Ahead of LoRA r 8 by more than 2 SE: no adaptive method."
    assert lines[2].endswith(
        "It did not learn in this budget: it improved on always 'fresh' by less than a tenth of what LoRA r 8 did."
    )  # 0 of the 0.23 LoRA r 8 gained
    assert lines[3].endswith("No rank moved in this run: it trained as LoRA r 8.")


def test_a_loss_that_barely_moved_counts_as_not_learned():
    task = Task("lm", "a causal task", {}, {}, {}, (1e-3,), metric="loss", higher_is_better=False,
                second_metric="perplexity")  # fmt: skip
    rows = [
        _summary("lora-r8", "LoRA r 8", (1.85, 0.01), 1000, 20, lora_r=8),  # 0.75 better than the base model
        _summary("adalora", "AdaLoRA", (2.58, 0.01), 1000, 20),  # 0.02 better: under a tenth of 0.75
        _summary("hetero-static", "static", (1.90, 0.01), 900, 20),
    ]
    rows[1]["ranks"] = rows[2]["ranks"] = "9 × r 32"
    lines = headline(task, rows, {"loss": 2.60, "perplexity": 13.5, "label": "the base model"})
    assert "It did not learn in this budget" in lines[2]
    assert "did not learn" not in lines[3] and "No rank moved" not in lines[3]
