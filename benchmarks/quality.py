"""The quality study: LoRA's parameter curve and every allocation method, tuned alike, over paired seeds.

Every run goes through ranktune's own `train`; its test metrics come from `ranktune eval` on the saved adapter, so
what is measured is what a user gets. Selection reads validation only. The record of every finished run is appended
to docs/data/quality/records.jsonl (committed), so a study stopped at any point, on any machine, continues where it
stopped in a fresh clone; the adapters themselves live under --work and are not needed again. Writes docs/results.md
and its plots from the records.

    python -m benchmarks.quality [--profile cpu|gpu] [--tasks NAME ...] [--methods NAME ...] [--jobs 2]
    python -m benchmarks.quality --report-only     # the report from the committed records, no training
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.quality_study import PROFILES, Method, Profile, Task, base_grid, extension, run_config, run_id

RECORDS = Path("docs/data/quality/records.jsonl")


class RunFailed(RuntimeError):
    """A run of the study failed; its log says why."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study."""

    task: Task
    method: Method
    learning_rate: float
    seed: int

    @property
    def key(self) -> str:
        return run_id(self.task, self.method, self.learning_rate, self.seed)

    def describe(self) -> str:
        return f"{self.task.name} / {self.method.label} (lr {self.learning_rate:g}, seed {self.seed})"


# --- one run, in a worker process -------------------------------------------------------------------------------


def _exit_with_parent(parent: int) -> None:
    """Ends this worker when the study's process is gone (killed, not just interrupted), so no orphan keeps training."""
    while os.getppid() == parent:
        time.sleep(5)
    os._exit(1)


def _init_worker(threads: int) -> None:
    """Each worker: `threads` torch threads, the libraries' own progress output silenced, and an end with the study."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    import torch

    torch.set_num_threads(threads)
    import datasets
    import transformers

    from ranktune.cli.main import _quiet_libraries

    _quiet_libraries()
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


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
    if code != 0:
        raise RunFailed(f"`ranktune {' '.join(argv)}` exited with {code}")
    return captured.getvalue()


def adapter_size(adapter_dir: Path) -> dict[str, Any]:
    """LoRA modules, total rank, rank range and parameters of the exported adapter."""
    from ranktune.adapters.layout import module_totals, read_module_ranks

    ranks = read_module_ranks(adapter_dir)
    totals = module_totals(ranks)
    values = [module.rank for module in ranks] or [0]
    return {
        "modules": totals["module_count"],
        "total_rank": totals["total_rank"],
        "rank_range": [min(values), max(values)],
        "adapter_parameters": totals["adapter_parameters"],
    }


def validation_history(output_dir: Path, metric: str) -> list[list[float]]:
    """[[step, validation metric], ...] from the run's metrics.jsonl, in step order."""
    history = []
    for line in (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if f"eval_{metric}" in entry:
            history.append([int(entry["step"]), float(entry[f"eval_{metric}"])])
    return sorted(history)


def execute(spec: RunSpec, work: str, keep_adapter: bool = False) -> dict[str, Any]:
    """Trains one run, scores its saved adapter on the test file, and returns its record (the adapter is deleted
    unless `keep_adapter`: the record holds what the report needs)."""
    import torch

    from ranktune import assets, train
    from ranktune.config import validate_config

    task, method = spec.task, spec.method
    folder = Path(work) / task.name / method.name / f"{spec.key}-seed{spec.seed}"
    started = time.perf_counter()
    try:
        with _logged(folder.with_suffix(".log")):
            config = run_config(task, method, spec.learning_rate, spec.seed, str(folder))
            result = train(validate_config(config, source=spec.describe()), overwrite=True)
            argv = ["eval", str(folder), "--data", assets.resolve(task.test), "--json", "--batch-size", "64"]
            if task.test_samples:
                argv += ["--max-samples", str(task.test_samples)]
            test = json.loads(_cli(*argv).strip().splitlines()[-1])
            history = validation_history(folder, task.metric)
            size = adapter_size(folder)
    except Exception as error:
        raise RunFailed(f"{spec.describe()} failed: {error}; see {folder.with_suffix('.log')}") from error
    final = {key.removeprefix("eval_"): value for key, value in result.metrics.items() if key.startswith("eval_")}
    if not keep_adapter:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "id": spec.key,
        "task": task.name,
        "method": method.name,
        "learning_rate": spec.learning_rate,
        "seed": spec.seed,
        "validation": {task.metric: final[task.metric], task.second_metric: final.get(task.second_metric)},
        "history": history,
        "test": {task.metric: test[task.metric], task.second_metric: test.get(task.second_metric)},
        "trained_parameters": result.info["trainable_parameters"],
        **size,
        "train_seconds": float(result.metrics["train_runtime"]),
        "run_seconds": time.perf_counter() - started,  # training, validation and test scoring
        "threads": torch.get_num_threads(),
    }


# --- records and scheduling -------------------------------------------------------------------------------------


@dataclass
class RecordStore:
    """The study's records, one JSON line per finished run, read back so that finished runs are not repeated."""

    path: Path

    def load(self) -> dict[str, dict[str, Any]]:
        """{run id: record}; a torn last line (a run killed while writing) is skipped."""
        if not self.path.is_file():
            return {}
        records = {}
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["id"]] = record
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Adds one line; after a line torn by a kill, on a line of its own."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        with self.path.open("a", encoding="utf-8") as out:
            out.write(("\n" if torn else "") + json.dumps(record) + "\n")


def better(task: Task, a: float, b: float) -> bool:
    """Whether metric value `a` beats `b` on this task (a NaN never does, and any number beats a NaN)."""
    if a != a:  # NaN
        return False
    if b != b:
        return True
    return a > b if task.higher_is_better else a < b


@dataclass(frozen=True)
class Selection:
    """Where a method's tuning stands on a task."""

    grid: list[float]
    chosen: float | None  # None until every point of the grid has run
    settled: bool  # chosen is final (inside the grid, or the extensions are used up)


def select(task: Task, method: Method, seed: int, records: dict[str, dict[str, Any]]) -> Selection:
    """The tuning grid so far (base grid plus the extensions the results called for) and its choice."""
    grid = list(base_grid(task, method))
    while True:
        results = {lr: records.get(run_id(task, method, lr, seed)) for lr in grid}
        if any(record is None for record in results.values()):
            return Selection(grid, None, False)
        chosen = grid[0]
        for lr in grid[1:]:
            if better(task, results[lr]["validation"][task.metric], results[chosen]["validation"][task.metric]):
                chosen = lr
        more = extension(grid, chosen)
        if more is None or more in grid:
            return Selection(grid, chosen, True)
        grid.append(more)


def pending(task: Task, method: Method, seeds: Sequence[int], records: dict[str, dict[str, Any]]) -> list[RunSpec]:
    """The runs this method needs next on this task: tuning points first, then the chosen setting's other seeds."""
    first, *others = seeds
    selection = select(task, method, first, records)
    if not selection.settled:
        return [
            RunSpec(task, method, lr, first) for lr in selection.grid if run_id(task, method, lr, first) not in records
        ]
    return [
        RunSpec(task, method, selection.chosen, seed)
        for seed in others
        if run_id(task, method, selection.chosen, seed) not in records
    ]


class Study:
    """Runs a profile's pending runs, at most `jobs` at a time, one line per run.

    What runs next is decided when a worker frees up, from the records so far: a method's other seeds start as soon
    as its tuning has settled, and the next task's runs start when the current one has nothing left to hand out, so
    no core waits for the slowest run of a round.
    """

    def __init__(self, profile: Profile, work: Path, store: RecordStore, keep_adapters: bool = False) -> None:
        self.profile = profile
        self.work = work
        self.store = store
        self.records = store.load()
        self.keep_adapters = keep_adapters
        self.done = 0
        self.started = time.perf_counter()

    def _progress(self, message: str) -> None:
        minutes = (time.perf_counter() - self.started) / 60
        print(f"[{self.done} runs this session, {minutes:.1f} min] {message}", file=sys.stderr, flush=True)

    def _next(self, busy: set[str]) -> RunSpec | None:
        """The first pending run (tasks, then methods, in the profile's order) that is not running already."""
        for task in self.profile.tasks:
            for method in self.profile.methods:
                for spec in pending(task, method, self.profile.seeds, self.records):
                    if spec.key not in busy:
                        return spec
        return None

    def run(self, pool: ProcessPoolExecutor, jobs: int) -> None:
        """Until nothing is pending: keep `jobs` runs going, record each as it ends.

        Raises:
            RunFailed: a run failed (the others went on and are recorded; a rerun retries the failed one).
        """
        running: dict[Future, RunSpec] = {}
        failures: list[str] = []
        while True:
            while len(running) < jobs:
                spec = self._next({s.key for s in running.values()} | set(failures))
                if spec is None:
                    break
                running[pool.submit(execute, spec, str(self.work), self.keep_adapters)] = spec
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                spec = running.pop(future)
                try:
                    record = future.result()
                except RunFailed as failure:
                    failures.append(spec.key)
                    self._progress(f"error: {failure}")
                    continue
                self.store.append(record)
                self.records[record["id"]] = record
                self.done += 1
                task = spec.task
                self._progress(
                    f"{spec.describe()}: validation {task.metric} {record['validation'][task.metric]:.4f}, "
                    f"test {record['test'][task.metric]:.4f}, {record['adapter_parameters']:,} adapter parameters, "
                    f"{record['run_seconds']:.0f} s"
                )
        if failures:
            raise RunFailed(f"{len(failures)} run(s) failed (see the error lines above); a rerun retries them")


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


def run_study(study: Study, jobs: int) -> None:
    """The study's pending runs, `jobs` at a time in worker processes (cores / jobs threads each)."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        study.run(pool, jobs)


def main(argv: list[str] | None = None) -> None:
    from benchmarks.quality_report import write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--tasks", nargs="+", metavar="NAME", help="only these tasks (default: all of the profile)")
    parser.add_argument("--methods", nargs="+", metavar="NAME", help="only these methods (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("--work", default="runs/quality", help="where runs are written while they train")
    parser.add_argument("--records", help=f"the record file (default {RECORDS} for cpu, ...-gpu.jsonl for gpu)")
    parser.add_argument("--out", help="the report (default docs/results.md for the cpu profile)")
    parser.add_argument("--keep-adapters", action="store_true", help="keep every run's adapter under --work")
    parser.add_argument("--report-only", action="store_true", help="write the report from the records; train nothing")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    full = PROFILES[args.profile]()
    profile = Profile(full.name, _pick(full.tasks, args.tasks, "--tasks"),
                      _pick(full.methods, args.methods, "--methods"), full.seeds, full.notes)  # fmt: skip
    default_records = RECORDS if profile.name == "cpu" else RECORDS.with_name(f"records-{profile.name}.jsonl")
    store = RecordStore(Path(args.records) if args.records else default_records)
    out = Path(args.out) if args.out else Path("docs/results.md" if profile.name == "cpu" else "docs/results-gpu.md")
    if not args.report_only:
        run_study(Study(profile, Path(args.work) / profile.name, store, args.keep_adapters), args.jobs)
    for path in write_report(full, store.load(), out):  # the whole study's report, whatever subset trained now
        print(f"written: {path}")


if __name__ == "__main__":
    try:
        main()
    except RunFailed as failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: every finished run is recorded; run the same command again to continue", file=sys.stderr)
        sys.exit(130)
