"""The study's statistics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from benchmarks.quality_report import _ratio
from benchmarks.quality_stats import (
    detectable_gain,
    holm,
    mean_history,
    on_curve,
    oriented,
    paired,
    parameters_for,
    steps_to,
)


def test_paired_t_test_by_hand():
    """Differences 1, 2, 3: mean 2, SE 1/√3, t = 2√3 with 2 degrees of freedom, whose two-sided p-value is
    1 - t / √(t² + 2) (the t distribution's CDF with 2 degrees of freedom has that closed form)."""
    result = paired([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    t = 2 * math.sqrt(3)
    assert (result.mean, result.n) == (2.0, 3)
    assert result.se == pytest.approx(1 / math.sqrt(3))
    assert result.p == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert result.describe() == "+2.0000 ± 0.5774 (p 0.0742)"


def test_paired_without_spread_or_pairs_has_no_p_value():
    assert math.isnan(paired([1.0, 2.0], [0.0, 1.0]).p)  # identical differences
    assert math.isnan(paired([1.0], [0.0]).se)


def test_curve_is_read_linear_in_log_parameters():
    curve = [(100.0, 0.5), (400.0, 0.7), (1600.0, 0.8)]
    assert on_curve(curve, 200.0) == pytest.approx(0.6)  # log2: halfway between 100 and 400
    assert on_curve(curve, 400.0) == pytest.approx(0.7)
    assert on_curve(curve, 50.0) is None and on_curve(curve, 3200.0) is None  # no extrapolation
    assert parameters_for(curve, 0.6) == pytest.approx(200.0)
    assert parameters_for(curve, 0.75) == pytest.approx(800.0)
    assert parameters_for(curve, 0.4) == 100.0  # already reached by the smallest adapter
    assert parameters_for(curve, 0.9) is None


def test_time_to_quality_on_the_mean_curve():
    histories = [[[10, 0.5], [20, 0.7], [30, 0.8]], [[10, 0.7], [20, 0.7], [30, 0.6]], [[10, 0.6], [20, 0.7]]]
    mean = mean_history(histories)
    assert mean == [(10, pytest.approx(0.6)), (20, pytest.approx(0.7))]  # step 30 is not in every run
    assert steps_to(mean, 0.65) == 20 and steps_to(mean, 0.6) == 10 and steps_to(mean, 0.9) is None


def test_oriented_turns_a_loss_so_that_larger_is_better():
    assert oriented(2.0, higher_is_better=False) == -2.0 and oriented(0.8, higher_is_better=True) == 0.8


def test_holm_by_hand():
    """Sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04, then made non-decreasing: 0.03, 0.06, 0.06."""
    adjusted = holm([0.01, 0.04, math.nan, 0.03])
    assert adjusted[0] == pytest.approx(0.03) and adjusted[1] == pytest.approx(0.06)
    assert adjusted[3] == pytest.approx(0.06) and math.isnan(adjusted[2])


def test_parameter_ratio_wording():
    curve = [(100.0, 0.5), (400.0, 0.7), (1600.0, 0.8)]
    assert _ratio(curve, 0.6, 100.0, complete_curve=True) == "200 (0.50x)"  # half of what LoRA needs
    assert _ratio(curve, 0.4, 50.0, complete_curve=True) == "≤ 100 (≥ 0.50x)"
    assert _ratio(curve, 0.9, 1600.0, complete_curve=True) == "above LoRA r 16"
    assert _ratio(curve, 0.9, 1600.0, complete_curve=False) == "—"  # the curve's top is not measured yet


@pytest.mark.parametrize("n", [3, 5, 10])
def test_detectable_gain_is_found_four_times_in_five(n):
    """Simulated studies of n paired seeds whose true gain is the detectable one reach p < 0.05 in 80 % of cases
    (20,000 studies: the rate's standard error is 0.003)."""
    spread = 0.02
    gain = detectable_gain(spread, n)
    differences = np.random.default_rng(n).normal(gain, spread, size=(20_000, n))
    rate = float(np.mean(stats.ttest_1samp(differences, 0.0, axis=1).pvalue < 0.05))
    assert rate == pytest.approx(0.8, abs=0.012)


def test_detectable_gain_with_many_pairs_is_the_normal_approximation():
    """With 200 pairs t is nearly normal: (z(0.975) + z(0.8)) / √200 = (1.95996 + 0.84162) / 14.1421 = 0.19810."""
    assert detectable_gain(1.0, 200) == pytest.approx(0.19810, rel=0.01)
    assert math.isnan(detectable_gain(1.0, 2)) and math.isnan(detectable_gain(0.0, 5))
