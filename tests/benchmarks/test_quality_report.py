"""The report's arithmetic against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from benchmarks.quality_report import compare, mean_std


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
    assert found["verdict"] == "no difference shown"  # 0.02 <= 2 x 0.0129


def test_lower_is_better_for_a_loss():
    better = compare(_row(1.50, 0.01), _row(1.60, 0.01), higher_is_better=False)
    assert better["gain"] == pytest.approx(0.10) and better["verdict"] == "better"
    worse = compare(_row(1.70, 0.01), _row(1.60, 0.01), higher_is_better=False)
    assert worse["gain"] == pytest.approx(-0.10) and worse["verdict"] == "worse"
