"""docs/results.md and its plots, from the quality study's records alone (so any clone can regenerate them)."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.quality import select
from benchmarks.quality_stats import (
    Paired,
    detectable_gain,
    detection_rate,
    holm,
    mean_history,
    on_curve,
    oriented,
    paired,
    parameters_for,
    steps_to,
)
from benchmarks.quality_study import Method, Profile, Task, run_id

SIGNIFICANT = 0.05


@dataclass
class Outcome:
    """A method's tuning and its chosen setting's runs on one task."""

    method: Method
    grid: dict[float, float]  # learning rate -> validation metric of the first seed
    chosen: float | None
    at_edge: bool
    runs: dict[int, dict[str, Any]]  # seed -> record of the chosen setting

    def test(self, task: Task) -> dict[int, float]:
        return {seed: run["test"][task.metric] for seed, run in self.runs.items()}

    def mean_test(self, task: Task) -> float:
        """The mean test metric over seeds, turned so that larger is better."""
        return oriented(statistics.fmean(self.test(task).values()), task.higher_is_better)

    def parameters(self) -> float:
        return statistics.fmean(run["adapter_parameters"] for run in self.runs.values())


def outcome(task: Task, method: Method, seeds: tuple[int, ...], records: dict[str, dict[str, Any]]) -> Outcome:
    selection = select(task, method, seeds[0], records)
    grid = {
        lr: records[run_id(task, method, lr, seeds[0])]["validation"][task.metric]
        for lr in selection.grid
        if run_id(task, method, lr, seeds[0]) in records
    }
    runs = {}
    if selection.chosen is not None:
        runs = {s: records[k] for s in seeds if (k := run_id(task, method, selection.chosen, s)) in records}
    at_edge = selection.settled and selection.chosen in (min(selection.grid), max(selection.grid))
    return Outcome(method, grid, selection.chosen, at_edge, runs)


def _mean_se(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) / math.sqrt(len(values)):.4f}"


def _pairs(task: Task, ours: Outcome, theirs: Outcome) -> Paired | None:
    seeds = sorted(set(ours.runs) & set(theirs.runs))
    if len(seeds) < 2:
        return None
    a = [oriented(ours.test(task)[s], task.higher_is_better) for s in seeds]
    b = [oriented(theirs.test(task)[s], task.higher_is_better) for s in seeds]
    return paired(a, b)


def _curve_pairs(task: Task, ours: Outcome, frontier: list[Outcome]) -> Paired | None:
    """Per seed: the method's test metric minus LoRA's curve (that seed's LoRA runs) at the method's parameters."""
    seeds = sorted(set(ours.runs).intersection(*(set(o.runs) for o in frontier)))
    a, b = [], []
    for seed in seeds:
        curve = sorted((o.runs[seed]["adapter_parameters"], oriented(o.runs[seed]["test"][task.metric],
                        task.higher_is_better)) for o in frontier)  # fmt: skip
        value = on_curve(curve, ours.runs[seed]["adapter_parameters"])
        if value is None:
            return None
        a.append(oriented(ours.runs[seed]["test"][task.metric], task.higher_is_better))
        b.append(value)
    return paired(a, b) if len(a) >= 2 else None


def _mean_curve(task: Task, frontier: list[Outcome]) -> list[tuple[float, float]]:
    return sorted((o.parameters(), o.mean_test(task))
                  for o in frontier if o.runs)  # fmt: skip


def _ratio(curve: list[tuple[float, float]], mean: float, parameters: float, complete_curve: bool) -> str:
    """`LoRA parameters for its quality (ratio)` of the table."""
    needed = parameters_for(curve, mean)
    if needed is None:
        return "above LoRA r 16" if complete_curve and curve and mean > curve[-1][1] else "—"
    if needed == curve[0][0]:
        return f"≤ {needed:,.0f} (≥ {parameters / needed:.2f}x)"  # LoRA's smallest adapter already reaches it
    return f"{needed:,.0f} ({parameters / needed:.2f}x)"


def majority_accuracy(task: Task) -> float | None:
    """Test accuracy of always answering the training split's most common label (classification), on the test rows
    the methods are scored on (`ranktune eval --max-samples` draws them with the data section's seed)."""
    if task.model["task"] != "classification":
        return None
    import datasets

    from ranktune import assets
    from ranktune.config import DataConfig
    from ranktune.data import load_file, subsample

    datasets.disable_progress_bars()
    seed = DataConfig.model_validate({"train": task.data["train"]}).seed
    train = load_file(assets.resolve(task.data["train"]))["label"]
    test = subsample(load_file(assets.resolve(task.test)), task.test_samples, seed)["label"]
    majority = Counter(train).most_common(1)[0][0]
    return sum(label == majority for label in test) / len(test)


@dataclass
class TaskSummary:
    """The lines of the closing summary for one task."""

    best: str
    half_parameters: bool
    ahead_of_curve: bool
    half_steps: bool
    complete: bool = False


def _task_section(
    task: Task, profile: Profile, records: dict[str, dict[str, Any]], plots: Path
) -> tuple[list[str], TaskSummary | None]:
    outcomes = [outcome(task, method, profile.seeds, records) for method in profile.methods]
    if not any(o.grid for o in outcomes):
        return [], None
    frontier = [o for o in outcomes if o.method.frontier]
    by_name = {o.method.name: o for o in outcomes}
    lora_at = {o.method.budget_r: o for o in frontier}

    def peer_of(method: Method) -> Outcome | None:
        return by_name.get(method.peer) if method.peer else lora_at.get(method.budget_r)

    def budget_of(method: Method) -> str:
        return by_name[method.peer].method.label if method.peer in by_name else f"r {method.budget_r}"

    mean_curve = _mean_curve(task, frontier)
    lora8 = lora_at.get(8)
    target = None
    if lora8 and lora8.runs:
        target = statistics.fmean(oriented(r["validation"][task.metric], task.higher_is_better)
                                  for r in lora8.runs.values())  # fmt: skip
    direction = "higher is better" if task.higher_is_better else "lower is better"
    finished = [o for o in outcomes if o.chosen is not None and len(o.runs) == len(profile.seeds)]
    lines = [f"## {task.title}", ""]
    if len(finished) < len(outcomes):
        lines += [
            f"**Incomplete**: {len(finished)} of {len(outcomes)} methods have run their chosen setting with every "
            "seed; the others show what has run so far (a rerun of the study continues).",
            "",
        ]
    majority = majority_accuracy(task)
    if majority is not None:
        lines += [f"Always answering the training split's most common label scores {majority:.4f} test accuracy.", ""]
    lines += [
        "| method | LoRA budget | adapter parameters | total rank (ranks) | learning rates tried (validation "
        f"{task.metric}, seed {profile.seeds[0]}) | seeds | test {task.metric} ({direction}) | vs LoRA at its "
        "budget | vs LoRA's curve at its parameters | LoRA parameters for its quality (ratio) "
        "| steps to LoRA r 8's validation |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = TaskSummary("none", False, False, False, complete=len(finished) == len(outcomes))
    measured = [o for o in outcomes if o.runs]
    curves = {o.method.name: _curve_pairs(task, o, frontier) for o in measured if not o.method.frontier}
    curves = {name: c for name, c in curves.items() if not by_name[name].method.baseline}  # Holm: ours only
    tested = [name for name, c in curves.items() if c is not None and not math.isnan(c.p)]
    adjusted = dict(zip(tested, holm([curves[name].p for name in tested]), strict=True))
    lora8_mean = None
    if lora8 is not None and lora8.runs:
        lora8_mean = lora8.mean_test(task)
    best_gain: float | None = None
    for o in outcomes:
        tried = ", ".join(f"{'**' if lr == o.chosen else ''}{lr:g}: {v:.4f}{'**' if lr == o.chosen else ''}"
                          for lr, v in sorted(o.grid.items()))  # fmt: skip
        if o.at_edge:
            tried += " (chosen at the grid's edge after its extensions)"
        if not o.runs:
            lines.append(f"| {o.method.label} | {budget_of(o.method)} | — | — | {tried or 'not run yet'} | 0 | — "
                         "| — | — | — | — |")  # fmt: skip
            continue
        first = next(iter(o.runs.values()))
        ranks = f"{first['total_rank']} ({first['rank_range'][0]}–{first['rank_range'][1]})"
        peer = peer_of(o.method)
        same = _pairs(task, o, peer) if peer is not None and not o.method.frontier else None
        counted = not (o.method.frontier or o.method.baseline)  # a ranktune method, judged against the target
        curve = curves.get(o.method.name)
        curve_text = "—"
        if curve is not None:
            curve_text = curve.describe()
            if o.method.name in adjusted:
                curve_text += f"; Holm p {adjusted[o.method.name]:.3g}"
        mean = o.mean_test(task)
        ratio = "—" if o.method.frontier else _ratio(mean_curve, mean, o.parameters(), len(mean_curve) == len(frontier))
        steps = "—"
        if target is not None:
            reached = steps_to([(s, oriented(v, task.higher_is_better)) for s, v in
                                mean_history([r["history"] for r in o.runs.values()])], target)  # fmt: skip
            steps = "not reached" if reached is None else f"{reached} ({reached / task.steps:.2f} of the run)"
            if reached is not None and reached <= task.steps / 2 and counted:
                summary.half_steps = True
        if counted and lora8_mean is not None and o.parameters() <= lora8.parameters() / 2:
            summary.half_parameters = summary.half_parameters or mean >= lora8_mean
        if counted and curve is not None and curve.mean > 0 and adjusted.get(o.method.name, math.nan) < SIGNIFICANT:
            summary.ahead_of_curve = True
        if counted and curve is not None and (best_gain is None or curve.mean > best_gain):
            best_gain = curve.mean
            summary.best = f"{o.method.label}: {curve_text} against LoRA's curve at its parameters"
        lines.append(
            f"| {o.method.label} | {budget_of(o.method)} | {o.parameters():,.0f} | {ranks} | {tried} | {len(o.runs)} "
            f"| {_mean_se(list(o.test(task).values()))} | {same.describe() if same else '—'} | "
            f"{curve_text} | {ratio} | {steps} |"
        )
    power = _power(curves.values(), len(profile.seeds), task.metric)
    versus = [(o, by_name[o.method.versus]) for o in measured if o.method.versus in by_name]
    for ours, theirs in versus:
        pair = _pairs(task, ours, theirs)
        gain = pair.describe() if pair else "fewer than 2 paired seeds so far"
        lines += ["", f"{ours.method.label} against {theirs.method.label} (paired test {task.metric}): {gain}."]
    lines += [
        "",
        f"Gains are paired over seeds ({task.metric}, positive = better), ± their standard error, with the two-sided "
        "paired t-test's p-value; against LoRA's curve also Holm's adjustment over the methods of this table (the "
        "target counts only those). LoRA's curve is read per seed, linear in log(parameters) between the neighbouring "
        "ranks. *LoRA parameters for its quality*: where LoRA's mean curve reaches the method's mean, and the "
        "method's parameters as a multiple of that (below 1: it needs fewer parameters than LoRA for its quality). "
        "*Steps to LoRA r 8's validation*: the first evaluation at which the method's mean validation curve reaches "
        "LoRA r 8's mean final validation value (calibration passes before step 0, for EVA and the gradient method, "
        "are not counted in steps).",
        "",
        *([power, ""] if power else []),
    ]
    plot = _plot(task, outcomes, plots)
    if plot:
        lines += [f"![test {task.metric} against adapter parameters]({plot})", ""]
    notes = [f"- {o.method.label}: {o.method.note}" for o in outcomes if o.method.note]
    return lines + notes + [""], summary


def _power(comparisons: Iterable[Paired | None], seeds: int, metric: str) -> str | None:
    """What these seeds can see: the smallest gain over LoRA's curve found at p < 0.05 four times in five, at the
    median spread of this table's paired differences (comparisons with every seed only)."""
    spreads = [c.se * math.sqrt(c.n) for c in comparisons if c is not None and c.n == seeds and not math.isnan(c.se)]
    if not spreads:
        return None
    spread = statistics.median(spreads)
    gain = detectable_gain(spread, seeds, SIGNIFICANT)
    return (
        f"*Power*: over {seeds} paired seeds the differences against LoRA's curve have a median standard deviation of "
        f"{spread:.4f} ({metric}); at that spread a true gain of {gain:.4f} reaches p < {SIGNIFICANT} four times in "
        f"five (two-sided paired t-test, before Holm's adjustment), one of half that size "
        f"{detection_rate(gain / 2, spread, seeds, SIGNIFICANT):.0%} of the time."
    )


def _plot(task: Task, outcomes: list[Outcome], folder: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(o, o.parameters(), list(o.test(task).values())) for o in outcomes if o.runs]
    if not points:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    curve = sorted((p, statistics.fmean(v)) for o, p, v in points if o.method.frontier)
    if curve:
        axis.plot(*zip(*curve, strict=True), "-o", color="gray", label="LoRA r 1–16")
    for o, parameters, values in points:
        if o.method.frontier:
            continue
        se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        axis.errorbar(parameters, statistics.fmean(values), yerr=se, fmt="s", capsize=3, label=o.method.label)
    axis.set_xscale("log")
    axis.set_xlabel("adapter parameters")
    axis.set_ylabel(f"test {task.metric}")
    axis.set_title(task.title, fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task.name}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"{folder.name}/{path.name}"


def write_report(profile: Profile, records: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """Writes the report and its plots (beside it, in results/); returns the paths written."""
    plots = out.parent / out.stem  # docs/results.md -> docs/results/; another report gets its own folder
    if plots.is_dir():
        for stale in plots.glob("*.png"):
            stale.unlink()
    runs = [r for r in records.values() if r["task"] in {t.name for t in profile.tasks}]
    hours = sum(r["run_seconds"] for r in runs) / 3600
    lines = [
        "# Quality study: LoRA's parameter curve against methods that choose where rank goes",
        "",
        f"Written by `python -m benchmarks.quality --profile {profile.name}` from the {len(runs)} run records in "
        "docs/data/quality/ (a rerun continues from them); every number below was measured in those runs "
        f"({hours:.1f} hours of run time).",
        "",
        "Every method is tuned alike: three learning rates with the first seed, chosen on validation, the grid "
        "extended past a choice at its edge; the chosen setting then runs with seeds "
        f"{', '.join(map(str, profile.seeds))}, paired across methods (a seed fixes the data order). Test metrics "
        "come from `ranktune eval` on each saved adapter; selection never reads them. *Adapter parameters*: the "
        "exported adapter's LoRA parameters (a classifier head, the same for every method, is left out), mean over "
        "seeds.",
        "",
        *(f"- {note}" for note in profile.notes),
        "",
    ]
    summaries = {}
    for task in profile.tasks:
        section, summary = _task_section(task, profile, records, plots)
        lines += section
        if summary:
            summaries[task.title] = summary
    if summaries:
        lines += ["## Against the target", ""]
        waiting = [title for title, s in summaries.items() if not s.complete]
        if waiting:
            lines += [f"Not judged until their runs are complete: {'; '.join(waiting)}.", ""]
        for title, s in ((t, s) for t, s in summaries.items() if s.complete):
            lines.append(f"- {title}: best against LoRA's curve: {s.best}. Ahead of the curve at p < {SIGNIFICANT}: "
                         f"{'yes' if s.ahead_of_curve else 'no'}; LoRA r 8's quality with at most half its parameters: "
                         f"{'yes' if s.half_parameters else 'no'}; LoRA r 8's validation in at most half the steps: "
                         f"{'yes' if s.half_steps else 'no'}.")  # fmt: skip
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    return [out, *sorted(plots.glob("*.png"))] if plots.exists() else [out]
