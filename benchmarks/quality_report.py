"""The quality study's report: per task and method, mean ± std over seeds, the comparison with LoRA at the same
budget, a plot of test metric against adapter parameters, the final rank heatmaps, and the raw records as JSON."""

from __future__ import annotations

import json
import math
import statistics
from datetime import date
from pathlib import Path
from typing import Any

from benchmarks.common import machine
from benchmarks.quality_study import BUDGET_R, Method, Profile, Task
from ranktune.adapters.layout import read_module_ranks
from ranktune.reports import plot_module_heatmap

REFERENCE = f"lora-r{BUDGET_R}"  # what every adaptive method is compared with: LoRA at the budget it is matched to


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(task: Task, method: Method, selection: dict[str, Any], records: dict[str, dict]) -> dict[str, Any]:
    """One row of a task's table: the chosen setting and its runs over the seeds."""
    final = [records[key] for key in selection["final"]]
    tuning = [records[key] for key in selection["tuning"]]
    every_run = {record["id"]: record for record in tuning + final}.values()
    test = [record["test"][task.metric] for record in final]
    second = [record["test"][task.second_metric] for record in final]
    validation = [record["validation"][task.metric] for record in final]
    return {
        "task": task.name,
        "method": method.name,
        "label": method.label,
        "lora_r": method.lora_r,
        "chosen": selection["chosen"],
        "seeds": [record["seed"] for record in final],
        "test": mean_std(test),
        "test_values": test,
        "second": mean_std(second),
        "validation": mean_std(validation),
        "adapter_parameters": mean_std([record["adapter_parameters"] for record in final]),
        "trained_parameters": statistics.fmean(record["trained_parameters"] for record in final),
        "total_rank": mean_std([record["total_rank"] for record in final]),
        "first_seed_shortcuts": final[0]["shortcuts"],
        "train_seconds": mean_std([record["train_seconds"] for record in final]),
        "wall_seconds": mean_std([record["wall_seconds"] for record in final]),
        "study_seconds": sum(record["wall_seconds"] + record.get("test_seconds", 0.0) for record in every_run),
        "runs": len(every_run),
        "first_seed_dir": final[0]["adapter_dir"],
        "ranks": rank_spread(final[0]["adapter_dir"]),
    }


def compare(row: dict[str, Any], reference: dict[str, Any], higher_is_better: bool) -> dict[str, float | str]:
    """The gain over the reference (positive = better) with its standard error, and a plain verdict.

    The standard error is sqrt(s1²/n1 + s2²/n2) over the seeds; a gain within two of them is not told from noise.
    With three seeds a side this is a rough screen, not a significance test.
    """
    (mean, std), (ref_mean, ref_std) = row["test"], reference["test"]
    gain = (mean - ref_mean) if higher_is_better else (ref_mean - mean)
    error = math.sqrt(std**2 / len(row["seeds"]) + ref_std**2 / len(reference["seeds"]))
    verdict = "within 2 SE" if abs(gain) <= 2 * error else ("ahead by > 2 SE" if gain > 0 else "behind by > 2 SE")
    return {"gain": gain, "error": error, "verdict": verdict}


def _number(value: float) -> str:
    return f"{value:,.0f}"


def _metric(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.4f} ± {pair[1]:.4f}"


def _chosen(row: dict[str, Any]) -> str:
    chosen = row["chosen"]
    return f"lr {chosen['learning_rate']:g}, {chosen['knob'].split('.')[-1]} {chosen['knob_value']}"


def rank_spread(adapter_dir: str) -> str:
    """`37 × r 2–16`: how many LoRA modules an adapter has and the range of their ranks (`none` without LoRA)."""
    ranks = [module.rank for module in read_module_ranks(adapter_dir)]
    if not ranks:
        return "none"
    low, high = min(ranks), max(ranks)
    return f"{len(ranks)} × r {low}" if low == high else f"{len(ranks)} × r {low}–{high}"


LEARNED_SHARE = 0.1  # of LoRA r 8's gain over the untrained baseline: below it, a method "did not learn"


def improvement(row: dict[str, Any], baseline: dict[str, Any], task: Task) -> float:
    """How much a method's mean test metric improves on the untrained baseline (positive = better)."""
    gain = row["test"][0] - baseline[task.metric]
    return gain if task.higher_is_better else -gain


def learned(row: dict[str, Any], rows: list[dict[str, Any]], baseline: dict[str, Any], task: Task) -> bool:
    """Whether a method improved on the untrained baseline by at least a tenth of what LoRA r 8 improved."""
    reference = next((other for other in rows if other["method"] == REFERENCE), None)
    needed = LEARNED_SHARE * improvement(reference, baseline, task) if reference is not None else 0.0
    return improvement(row, baseline, task) > max(needed, 0.0)


def task_table(task: Task, rows: list[dict[str, Any]], baseline: dict[str, Any]) -> list[str]:
    """The markdown table of a task: the untrained baseline, then one row per method."""
    reference = next((row for row in rows if row["method"] == REFERENCE), None)
    direction = "higher is better" if task.higher_is_better else "lower is better"
    lines = [
        "| method | adapter parameters | held in training | LoRA modules × ranks (seed 0) | chosen on validation "
        f"| test {task.metric} ({direction}) | test {task.second_metric} | gain over LoRA r {BUDGET_R} "
        "(positive = better) | train s / run | run s / run | all runs, min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {baseline['label']} | 0 | 0 | — | — | {baseline[task.metric]:.4f} | {baseline[task.second_metric]:.4f} "
        "| — | — | — | — |",
    ]
    for row in rows:
        versus = "—"
        if reference is not None and row is not reference:
            found = compare(row, reference, task.higher_is_better)
            versus = f"{found['gain']:+.4f} ± {found['error']:.4f} ({found['verdict']})"
        count = row["first_seed_shortcuts"]
        shortcuts = f" + {count} shortcut{'s' if count > 1 else ''} × r {BUDGET_R}" if count else ""
        lines.append(
            f"| {row['label']} | {_number(row['adapter_parameters'][0])} | {_number(row['trained_parameters'])} "
            f"| {row['ranks']}{shortcuts} | {_chosen(row)} | {_metric(row['test'])} | {_metric(row['second'])} "
            f"| {versus} | {row['train_seconds'][0]:.0f} | {row['wall_seconds'][0]:.0f} "
            f"| {row['study_seconds'] / 60:.1f} |"
        )
    return lines


def headline(task: Task, rows: list[dict[str, Any]], baseline: dict[str, Any]) -> list[str]:
    """Plain sentences: the best method on test, what each adaptive method did against LoRA r 8, and which runs
    did not learn at all (no better than the untrained baseline)."""
    best = max(rows, key=lambda row: row["test"][0] if task.higher_is_better else -row["test"][0])
    lines = [f"- Best mean test {task.metric}: {best['label']} ({_metric(best['test'])})."]
    reference = next((row for row in rows if row["method"] == REFERENCE), None)
    if reference is None:
        return lines
    adaptive = [(row, compare(row, reference, task.higher_is_better)) for row in rows if row["lora_r"] is None]
    ahead = [row["label"] for row, found in adaptive if found["verdict"].startswith("ahead")]
    lines.append(
        f"- Ahead of LoRA r {BUDGET_R} by more than 2 SE: {', '.join(ahead) if ahead else 'no adaptive method'}."
    )
    for row, found in adaptive:
        size = row["adapter_parameters"][0] / reference["adapter_parameters"][0]
        cost = row["wall_seconds"][0] / reference["wall_seconds"][0]
        line = (
            f"- {row['label']}, with {size:.2f}x the adapter parameters of LoRA r {BUDGET_R} and {cost:.2f}x its "
            f"time per run (search included): {task.metric} gain {found['gain']:+.4f} ± {found['error']:.4f}, "
            f"{found['verdict']}."
        )
        if not learned(row, rows, baseline, task):
            line += (
                f" It did not learn in this budget: it improved on {baseline['label']} by less than a tenth of "
                f"what LoRA r {BUDGET_R} did."
            )
        elif row["ranks"] == reference["ranks"] and not row["first_seed_shortcuts"]:
            line += f" No rank moved in this run: it trained as LoRA r {BUDGET_R}."
        lines.append(line)
    return lines


MARKERS = "osD^v<>Xph"


def plot_quality(task: Task, rows: list[dict[str, Any]], baseline: dict[str, Any], path: Path) -> Path:
    """Test metric (mean ± std over seeds) against adapter parameters; plain LoRA's ranks joined by a line. Methods
    that did not learn are named in the title instead of stretching the axis."""
    from ranktune.reports import pyplot, save_figure

    figure, axes = pyplot().subplots(figsize=(7, 4.5))
    shown = [row for row in rows if learned(row, rows, baseline, task)]
    lora = sorted((row for row in shown if row["lora_r"] is not None), key=lambda row: row["adapter_parameters"][0])
    if lora:
        axes.plot([row["adapter_parameters"][0] for row in lora], [row["test"][0] for row in lora], color="grey",
                  linestyle="--", linewidth=1, zorder=1)  # fmt: skip
    for marker, row in zip(MARKERS, rows, strict=False):
        if row in shown:
            axes.errorbar(row["adapter_parameters"][0], row["test"][0], yerr=row["test"][1], marker=marker,
                          capsize=3, label=row["label"], linestyle="none", alpha=0.85)  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("adapter parameters (exported)")
    axes.set_ylabel(f"test {task.metric}")
    left_out = [row["label"] for row in rows if row not in shown]
    title = task.title + (f"\nnot shown (did not learn): {', '.join(left_out)}" if left_out else "")
    axes.set_title(title, fontsize="medium")
    axes.legend(fontsize="x-small", loc="best")
    return save_figure(figure, path)


def tuning_table(task: Task, method: Method, selection: dict[str, Any], records: dict[str, dict]) -> list[str]:
    """Every tuning run of a method on a task with its validation metric; the chosen one in bold."""
    lines = []
    for key in selection["tuning"]:
        record = records[key]
        value = f"{record['validation'][task.metric]:.4f}"
        chosen = selection["chosen"]
        if (record["learning_rate"], record["knob_value"]) == (chosen["learning_rate"], chosen["knob_value"]):
            value = f"**{value}**"
        lines.append(f"lr {record['learning_rate']:g}, {method.knob[0].split('.')[-1]} {record['knob_value']}: {value}")
    return lines


def task_method_note(task: Task, profile: Profile) -> str:
    """How a task was tuned and measured, in one paragraph."""
    knobs = "× two values of the method's own knob" if task.knobs_tuned else "only (each knob at its first value)"
    rates = ", ".join(f"{rate:g}" for rate in task.learning_rates)
    note = (
        f"Tuning grid: learning rates {rates} {knobs}, with seed {profile.seeds[0]}; the chosen setting then ran "
        f"with seeds {', '.join(str(s) for s in profile.seeds[1:])} as well, and the seed-{profile.seeds[0]} tuning "
        "run counts as its first seed (so the first seed is the best of its grid on validation, for every method)."
    )
    if not task.higher_is_better:
        note += (
            f" Validation {task.metric} is the Trainer's eval_loss (a mean of batch means), test {task.metric} is "
            "token-weighted (`ranktune eval`); the two small splits also differ in their answers (the test answers "
            "are longer), so compare methods within a column, not validation with test."
        )
    return note


def rank_heatmap(row: dict[str, Any], modules: list[str], path: Path) -> Path:
    """The seed-0 adapter's rank of every module the task's LoRA r 8 adapts (0: no LoRA there)."""
    ranks = {module.module: module.rank for module in read_module_ranks(row["first_seed_dir"])}
    values = {name: ranks.get(name, 0) for name in sorted(set(modules) | set(ranks))}
    return plot_module_heatmap(values, path, f"{row['label']}: final rank", "rank")


def write_report(
    profile: Profile,
    selections: list[dict[str, Any]],
    records: dict[str, dict],
    baselines: dict[str, dict[str, Any]],
    out: Path,
) -> list[Path]:
    """Writes the markdown report `out`, its figures (in a folder named after it, beside it) and the raw data
    (data/<name>.json beside it).

    Args:
        baselines: per task, the untrained baseline's test metrics and its `label`.
    """
    figures = out.parent / out.stem
    data_path = out.parent / "data" / f"{out.stem}.json"
    chosen = {(s["task"], s["method"]): s for s in selections}
    rows_by_task = {
        task.name: [summarize(task, method, chosen[(task.name, method.name)], records) for method in profile.methods]
        for task in profile.tasks
    }
    study_minutes = sum(row["study_seconds"] for rows in rows_by_task.values() for row in rows) / 60
    lines = [
        f"# Quality study: what each method buys at the budget of LoRA r {BUDGET_R}",
        "",
        f"Written by `python -m benchmarks.quality --profile {profile.name}` on {date.today().isoformat()}; every "
        "result below was measured in that run. Machine: " + machine() + ".",
        "",
        "Every method gets the same tuning budget on a task (an equal-sized grid, chosen on the validation split) "
        f"and runs its chosen setting with {len(profile.seeds)} seeds; only those runs are evaluated on the test "
        "split, through `ranktune eval` on the saved adapter. Means ± sample standard deviations over the seeds. "
        "Plain LoRA runs at r 4, 8 and 16 on all linear layers. L1RA and AdaLoRA end at the total rank of LoRA r "
        f"{BUDGET_R} (L1RA with `budget: params` at its parameter count); HeteroLoRA keeps 8/r of the modules of an "
        "r pool, which is LoRA r 8's total rank only if the kept modules have the average size. Matching rank is "
        "not matching parameters (an FFN module costs more per rank than an attention one), so each table gives "
        "the parameters, and the plot places every method against plain LoRA's parameter curve. HeteroLoRA with "
        "shortcut connections is not matched at all: in `combined` mode LoRA modules and connections share "
        "floor(keep · N_lora) + round(keep · N_shortcuts) slots, so it ends above or below the budget depending "
        "on which kind wins them.",
        "",
        "*Adapter parameters*: the exported adapter's LoRA and shortcut parameters (a classifier head, the same for "
        "every method, is left out). *Held in training*: what the optimizer held (L1RA's capacity, HeteroLoRA's "
        "dynamic pool, AdaLoRA's init_r, the head). *Gain*: over LoRA r 8, positive = better, ± its standard error; "
        "*within 2 SE* means no difference is shown (with 3 seeds a side, a rough screen, not a significance test). "
        "*Train s*: the Trainer's training time; *run s*: the whole run (a static search's saliency pass, data, "
        "loading, validation and saving included). The first row of each table is the untrained baseline; a "
        "method that improved on it by less than a tenth of what LoRA r 8 did is said not to have learned in this "
        "budget (and left out of the plot).",
        "",
        *[f"- {note}" for note in profile.notes],
        f"- The whole study: {sum(row['runs'] for rows in rows_by_task.values() for row in rows)} training runs, "
        f"{study_minutes:.0f} minutes of run time.",
        "",
    ]
    written: list[Path] = []
    for task in profile.tasks:
        rows, baseline = rows_by_task[task.name], baselines[task.name]
        plot = plot_quality(task, rows, baseline, figures / f"{task.name}-quality.png")
        written.append(plot)
        lines += [f"## {task.title}", "", task_method_note(task, profile), "", *task_table(task, rows, baseline), "",
                  *headline(task, rows, baseline), "",
                  f"![test {task.metric} against adapter parameters]({out.stem}/{plot.name})", ""]  # fmt: skip
        everything = [m.module for row in rows if row["lora_r"] for m in read_module_ranks(row["first_seed_dir"])]
        heatmaps = []
        for row in rows:
            if row["lora_r"] is None:
                path = rank_heatmap(row, everything, figures / f"{task.name}-{row['method']}.png")
                written.append(path)
                heatmaps.append(f"![{row['label']}]({out.stem}/{path.name})")
        lines += [f"Final LoRA ranks (seed {profile.seeds[0]} of the chosen setting; 0: no LoRA there; shortcut "
                  "connections are not drawn):", "", " ".join(heatmaps), "",
                  "<details><summary>Tuning runs (validation " + task.metric + ")</summary>", ""]  # fmt: skip
        for method in profile.methods:
            runs = tuning_table(task, method, chosen[(task.name, method.name)], records)
            lines.append(f"- {method.label}: " + "; ".join(runs))
        lines += ["", "</details>", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    data_path.parent.mkdir(parents=True, exist_ok=True)
    used = {key for s in selections for key in s["tuning"] + s["final"]}
    payload = {
        "profile": profile.name,
        "machine": machine(),
        "baselines": baselines,
        "selections": selections,
        "summaries": rows_by_task,
        "records": [records[key] for key in sorted(used)],
    }
    data_path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return [out, data_path, *written]
