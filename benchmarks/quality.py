"""What each method buys: LoRA at several ranks against L1RA, AdaLoRA and HeteroLoRA at a matched budget.

Every run goes through ranktune's own `train` (and, for static HeteroLoRA, `ranktune saliency` and `ranktune plan`);
test metrics come from `ranktune eval` on the saved adapter, so what is measured is what a user gets. Each method is
tuned on validation data over an equal-sized grid with the first seed, the chosen setting runs with the other seeds,
and only those runs are evaluated on test data. Runs are cached in `--work` (one JSON line each), so an interrupted
study resumes where it stopped. Writes docs/results.md, its plots and heatmaps (docs/results/), and the raw records
(docs/data/results.json).

    python -m benchmarks.quality [--profile cpu|gpu] [--tasks NAME ...] [--methods NAME ...] [--work runs/quality]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from benchmarks.quality_report import write_report
from benchmarks.quality_study import (
    PROFILES,
    GridPoint,
    Method,
    Profile,
    Task,
    baseline_id,
    grid,
    keep_fraction,
    run_config,
    run_id,
)


def _quiet() -> None:
    """The study prints one line per run; each run's own output goes to its log file."""
    import datasets
    import transformers

    from ranktune.cli.main import _quiet_libraries

    _quiet_libraries()
    transformers.logging.set_verbosity_error()  # already imported here, so the variables came too late for it
    datasets.disable_progress_bars()


class RunFailed(RuntimeError):
    """A run of the study failed; its log says why."""


@contextlib.contextmanager
def _logged(path: Path) -> Iterator[None]:
    """Sends stdout and stderr of the block to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def _cli(*argv: str) -> str:
    """Runs a `ranktune` command in this process; returns what it printed on stdout."""
    from ranktune.cli.main import main

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = main(list(argv))
    sys.stdout.write(captured.getvalue())
    if code != 0:
        raise RunFailed(f"`ranktune {' '.join(argv)}` exited with {code}")
    return captured.getvalue()


def static_plan(config: dict[str, Any], heuristic: str, batches: int, seed: int, folder: Path) -> str:
    """Static HeteroLoRA: scores the config's pool with `ranktune saliency`, keeps its budget with `ranktune plan`."""
    folder.mkdir(parents=True, exist_ok=True)
    pool_config = folder / "pool.yaml"
    pool_config.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    scores, plan = folder / "scores.json", folder / "plan.yaml"
    _cli("saliency", str(pool_config), "--heuristic", heuristic, "--batches", str(batches), "--out", str(scores))
    keep = keep_fraction(config["lora"]["r"])
    _cli("plan", str(scores), "--keep", str(keep), "--seed", str(seed), "--out", str(plan))
    return str(plan)


def adapter_size(adapter_dir: Path) -> dict[str, int]:
    """LoRA modules, total rank and parameters of the exported adapter, shortcut connections included."""
    from ranktune.adapters.layout import module_totals, read_module_ranks, read_shortcut_ranks

    lora = module_totals(read_module_ranks(adapter_dir))
    shortcuts = module_totals(read_shortcut_ranks(adapter_dir))
    return {
        "modules": lora["module_count"],
        "total_rank": lora["total_rank"],
        "shortcuts": shortcuts["module_count"],
        "adapter_parameters": lora["adapter_parameters"] + shortcuts["adapter_parameters"],
    }


def train_one(task: Task, method: Method, point: GridPoint, seed: int, folder: Path) -> dict[str, Any]:
    """One training run (after its static search, if any); returns its record without test metrics."""
    from ranktune import train
    from ranktune.config import validate_config

    config = run_config(task, method, point, seed, str(folder))
    del config["data"]["test"]  # read only by `evaluate_test`, for the chosen settings; `train` would score it twice
    started = time.perf_counter()
    if method.static_search:
        search = folder.with_name(f"{folder.name}-search")
        config["lora"]["plan"] = static_plan(config, method.static_search, task.saliency_batches, seed, search)
    result = train(validate_config(config, source=f"{task.name}/{method.name}"), overwrite=True)
    wall = time.perf_counter() - started
    metric_key = f"eval_{task.metric}"
    second_key = f"eval_{task.second_metric}"
    return {
        "validation": {task.metric: result.metrics[metric_key], task.second_metric: result.metrics.get(second_key)},
        "train_seconds": result.metrics["train_runtime"],
        "wall_seconds": wall,
        "trained_parameters": result.info["trainable_parameters"],
        **adapter_size(folder),
    }


def evaluate_test(task: Task, adapter_dir: Path) -> dict[str, Any]:
    """`ranktune eval ADAPTER --data TEST --json`: the test metrics of a saved adapter."""
    from ranktune import assets

    printed = _cli("eval", str(adapter_dir), "--data", assets.resolve(task.data["test"]), "--json")
    return json.loads(printed.strip().splitlines()[-1])


def untrained_baseline(task: Task) -> dict[str, Any]:
    """What the task's test metrics are without fine-tuning: a classifier that always answers the training split's
    most common label, or the base language model with no adapter (scored like `ranktune eval`)."""
    from ranktune.config import validate_config
    from ranktune.data import build_collator
    from ranktune.evaluation import classification_metrics, evaluate
    from ranktune.training.run import prepare_run

    config = {"model": task.model, "data": task.data, "output_dir": "unused"}
    run = prepare_run(validate_config(config, source=f"{task.name} baseline"))
    test = run.datasets["test"]
    if task.model["task"] == "classification":
        labels = list(run.datasets["train"]["labels"])
        majority = max(set(labels), key=labels.count)
        truth = np.asarray(test["labels"])
        metrics = classification_metrics(np.full_like(truth, majority), truth, len(run.label_names))
        return {**metrics, "label": f"always '{run.label_names[majority]}' (no training)"}
    collator = build_collator(run.tokenizer, "causal_lm")
    metrics = evaluate(run.model, test, collator, "causal_lm", batch_size=8)
    return {**metrics, "label": "the base model (no adapter)"}


@dataclass
class RecordStore:
    """The study's records, one JSON line per run, read back on a rerun so finished runs are not repeated."""

    path: Path

    def load(self) -> dict[str, dict[str, Any]]:
        """{run id: record}; a run written twice (trained, then tested) keeps its last line."""
        if not self.path.is_file():
            return {}
        records = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short when a run was killed while writing it
                continue
            records[record["id"]] = record
        return records

    def forget(self, tasks: set[str], methods: set[str]) -> None:
        """Drops the records of these tasks' and methods' runs (and baselines of these tasks), keeping the rest."""
        kept = [
            json.dumps(record)
            for record in self.load().values()
            if record["task"] not in tasks or (record.get("method") not in methods and not record.get("baseline"))
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        """Adds one line, so a study stopped at any point keeps every run it finished."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")


def comparable(value: float, task: Task) -> float:
    """A metric turned so that larger is better; a diverged run (NaN or infinite) is the worst of all."""
    if not math.isfinite(value):
        return -math.inf
    return value if task.higher_is_better else -value


class Study:
    """Runs a profile's grid, seeds and test evaluations, printing one progress line per run."""

    def __init__(self, profile: Profile, work: Path) -> None:
        self.profile = profile
        self.work = work
        self.store = RecordStore(work / "records.jsonl")
        self.records = self.store.load()
        self.finished: set[str] = set()
        self.total = sum(
            len(grid(task, method)) + len(profile.seeds) - 1 for task in profile.tasks for method in profile.methods
        )
        self.started = time.perf_counter()

    def _progress(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(
            f"[{len(self.finished)}/{self.total} runs, {elapsed / 60:.1f} min] {message}", file=sys.stderr, flush=True
        )

    def run(self, task: Task, method: Method, point: GridPoint, seed: int, with_test: bool) -> dict[str, Any]:
        """The record of one run: from the cache if it ran before, else trained now (and tested if asked)."""
        config = run_config(task, method, point, seed, "")
        key = run_id(config, method, task)
        folder = self.work / task.name / method.name / f"{key}-seed{seed}"
        record = self.records.get(key)
        done = []
        if record is None:
            try:
                with _logged(folder.with_suffix(".log")):
                    measured = train_one(task, method, point, seed, folder)
            except Exception as error:
                raise RunFailed(f"{task.name} / {method.name} ({point.describe(method)}, seed {seed}) failed: "
                                f"{error}; see {folder.with_suffix('.log')}") from error  # fmt: skip
            record = {"id": key, "task": task.name, "method": method.name, "learning_rate": point.learning_rate,
                      "knob": method.knob[0], "knob_value": point.knob_value, "seed": seed, "adapter_dir": str(folder),
                      "test": None, **measured}  # fmt: skip
            self.store.append(record)
            done.append(f"trained in {record['wall_seconds']:.0f} s")
        if with_test and record["test"] is None:
            started = time.perf_counter()
            with _logged(folder.with_name(folder.name + "-test.log")):
                record["test"] = evaluate_test(task, Path(record["adapter_dir"]))
            record["test_seconds"] = time.perf_counter() - started
            self.store.append(record)
            done.append("tested")
        self.records[key] = record
        if key not in self.finished or done:
            self.finished.add(key)
            shown = f"validation {task.metric} {record['validation'][task.metric]:.4f}"
            if record["test"]:
                shown += f", test {task.metric} {record['test'][task.metric]:.4f}"
            self._progress(
                f"{task.name} / {method.label} ({point.describe(method)}, seed {seed}): {shown}, "
                f"{record['adapter_parameters']:,} adapter parameters ({', '.join(done) or 'cached'})"
            )
        return record

    def baseline(self, task: Task) -> dict[str, Any]:
        """The task's untrained baseline, from the cache or measured now."""
        key = baseline_id(task)
        record = self.records.get(key)
        if record is None:
            with _logged(self.work / task.name / "baseline.log"):
                test = untrained_baseline(task)
            record = {"id": key, "task": task.name, "baseline": True, "test": test}
            self.store.append(record)
            self.records[key] = record
        shown = f"{record['test'][task.metric]:.4f}"
        self._progress(f"{task.name} / baseline, {record['test']['label']}: test {task.metric} {shown}")
        return record["test"]

    def tune_and_repeat(self, task: Task, method: Method) -> dict[str, Any]:
        """Tunes the method on validation with the first seed, then runs the chosen point with every seed."""
        first, *others = self.profile.seeds
        tuning = [(point, self.run(task, method, point, first, with_test=False)) for point in grid(task, method)]
        chosen, _ = max(tuning, key=lambda pair: comparable(pair[1]["validation"][task.metric], task))
        final = [self.run(task, method, chosen, seed, with_test=True) for seed in (first, *others)]
        return {
            "task": task.name,
            "method": method.name,
            "chosen": {"learning_rate": chosen.learning_rate, "knob": method.knob[0], "knob_value": chosen.knob_value},
            "tuning": [record["id"] for _, record in tuning],
            "final": [record["id"] for record in final],
        }


Named = TypeVar("Named", Task, Method)


def _pick(items: Sequence[Named], names: list[str] | None, flag: str) -> tuple[Named, ...]:
    """The items called `names`, in that order (all of them when no names are given); exits on an unknown name."""
    if not names:
        return tuple(items)
    known = {item.name: item for item in items}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"error: {flag}: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
    return tuple(known[name] for name in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--tasks", nargs="+", metavar="NAME", help="only these tasks (default: all of the profile)")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (default: all)")
    parser.add_argument("--work", default="runs/quality", help="where runs and the record cache live")
    parser.add_argument("--out", help="the report (default docs/results.md; required with --tasks or --methods)")
    parser.add_argument("--fresh", action="store_true", help="delete the cached runs first (after changing ranktune)")
    args = parser.parse_args()
    if (args.tasks or args.methods) and not args.out:
        parser.error("--tasks and --methods make a partial study: give it its own --out, not docs/results.md")
    _quiet()
    profile = PROFILES[args.profile]()
    tasks = _pick(profile.tasks, args.tasks, "--tasks")
    methods = _pick(profile.methods, args.methods, "--methods")
    profile = Profile(profile.name, tasks, methods, profile.seeds, profile.notes)
    work = Path(args.work) / profile.name
    if args.fresh and (args.tasks or args.methods):
        RecordStore(work / "records.jsonl").forget({t.name for t in tasks}, {m.name for m in methods})
    elif args.fresh and work.exists():
        shutil.rmtree(work)
    study = Study(profile, work)
    selections = [study.tune_and_repeat(task, method) for task in profile.tasks for method in profile.methods]
    baselines = {task.name: study.baseline(task) for task in profile.tasks}
    written = write_report(profile, selections, study.records, baselines, Path(args.out or "docs/results.md"))
    for path in written:
        print(f"written: {path}")


if __name__ == "__main__":
    try:
        main()
    except RunFailed as failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)
