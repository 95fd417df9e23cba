"""The quality study's statistics: paired differences over seeds, LoRA's parameter curve, and time to quality.

Every function takes metrics turned so that larger is better (`oriented`), so a loss and an accuracy are read alike.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import optimize, stats


def oriented(value: float, higher_is_better: bool) -> float:
    """The metric turned so that larger is better."""
    return value if higher_is_better else -value


@dataclass(frozen=True)
class Paired:
    """A mean paired difference over seeds, its standard error and the two-sided paired t-test's p-value."""

    mean: float
    se: float
    p: float
    n: int

    def describe(self, digits: int = 4) -> str:
        """`+0.0123 ± 0.0040 (p 0.031)`."""
        p = "n/a" if math.isnan(self.p) else f"{self.p:.3g}"
        return f"{self.mean:+.{digits}f} ± {self.se:.{digits}f} (p {p})"


def paired(ours: Sequence[float], theirs: Sequence[float]) -> Paired:
    """ours[i] - theirs[i] over seeds i: the mean, its standard error, and the paired t-test (nan with < 2 pairs or
    identical differences)."""
    differences = [a - b for a, b in zip(ours, theirs, strict=True)]
    n = len(differences)
    mean = statistics.fmean(differences) if differences else math.nan
    if n < 2:
        return Paired(mean, math.nan, math.nan, n)
    se = statistics.stdev(differences) / math.sqrt(n)
    p = math.nan if se == 0 else float(stats.ttest_rel(ours, theirs).pvalue)
    return Paired(mean, se, p, n)


def on_curve(curve: Sequence[tuple[float, float]], parameters: float) -> float | None:
    """The curve's value at `parameters`, linear in log(parameters) between its two neighbouring points; None
    outside the curve. `curve`: (parameters, value) points, parameters increasing."""
    for (p0, v0), (p1, v1) in itertools.pairwise(curve):
        if p0 <= parameters <= p1:
            if p1 == p0:
                return v0
            t = (math.log(parameters) - math.log(p0)) / (math.log(p1) - math.log(p0))
            return v0 + t * (v1 - v0)
    return None


def parameters_for(curve: Sequence[tuple[float, float]], value: float) -> float | None:
    """The fewest parameters at which the curve reaches `value` (log-linear between points); None if it never does.
    Below the curve's first point the answer is that point's parameters at most, so the first point is returned."""
    if curve and curve[0][1] >= value:
        return curve[0][0]
    for (p0, v0), (p1, v1) in itertools.pairwise(curve):
        if v0 < value <= v1:
            t = (value - v0) / (v1 - v0)
            return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0)))
    return None


def mean_history(histories: Sequence[Sequence[Sequence[float]]]) -> list[tuple[int, float]]:
    """The mean over runs of their (step, value) histories, at the steps every run has."""
    common = set.intersection(*({int(step) for step, _ in history} for history in histories)) if histories else set()
    by_step = [{int(step): value for step, value in history} for history in histories]
    return [(step, statistics.fmean(values[step] for values in by_step)) for step in sorted(common)]


def steps_to(history: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first step whose value reaches `target`; None if none does."""
    for step, value in history:
        if value >= target:
            return step
    return None


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for testing them together (same order as given; NaN stays NaN)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def detection_rate(gain: float, spread: float, n: int, alpha: float = 0.05) -> float:
    """How often a two-sided paired t-test over `n` pairs finds p < `alpha` when the true mean difference is `gain`
    and the paired differences have standard deviation `spread`: t then follows the non-central t distribution with
    n - 1 degrees of freedom and non-centrality gain / spread · √n."""
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    shift = gain / spread * math.sqrt(n)
    upper = 1.0 - stats.nct.cdf(critical, df, shift)
    lower = stats.nct.cdf(-critical, df, shift)  # NaN far out in the tail, where it is 0
    return upper + (0.0 if math.isnan(lower) else lower)


def detectable_gain(spread: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference that a two-sided paired t-test over `n` pairs finds at p < `alpha` with
    probability `power`, when the paired differences have standard deviation `spread` (NaN below 3 pairs)."""
    if n < 3 or not spread > 0:
        return math.nan
    return optimize.brentq(lambda gain: detection_rate(gain, spread, n, alpha) - power, 1e-6 * spread, 20.0 * spread)
