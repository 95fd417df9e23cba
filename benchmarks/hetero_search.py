"""Does HeteroLoRA's dynamic search change its mind? Before and after fresh scoring batches and fresh-module scores.

The setting a user reported (issue 16): MiniLM-L6, LoRA r 8 on every linear layer plus the four shortcut kinds,
`allocation: {method: hetero, heuristic: grad_norm, every: 75, keep: 0.25, batches: 4, shortcuts_mode: combined}`,
on the quality study's SNLI (sentence pairs; 300 steps of 8 rows, one epoch) and Rotten Tomatoes tasks, so four
reallocations per run (steps 0, 75, 150, 225). Variants, each a `ranktune train` subprocess:

- before: ranktune as of `--before REV` (scoring over the first `batches` training batches every time, every
  candidate switched on and scored with its own factors), run from a git worktree of that revision;
- switched_on: fresh batches drawn at each reallocation, candidates still scored switched on with their own factors;
- fresh: fresh batches and every candidate scored as a fresh module would score (today's default).

For each run: how many candidates each reallocation after the first switched on and off, validation accuracy at
the end, and test accuracy from `ranktune eval`. Results: docs/hetero-search.md and docs/data/hetero_search.json.

    python -m benchmarks.hetero_search [--seeds 0 1 2] [--learning-rates 2e-3 2e-4] [--jobs 2] [--before b093f7b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.quality_study import Method, _lora, cpu_profile, run_config
from ranktune import assets
from ranktune.reports import reallocation_changes

REPO = Path(__file__).resolve().parents[1]
TASKS = ("minilm-snli", "minilm-rotten-tomatoes")
VARIANTS = ("before", "switched_on", "fresh")
LEARNING_RATES = (2e-3,)  # the middle of the study's grid for these tasks; ranktune's default, 2e-4, is an option
SEARCH = {"method": "hetero", "heuristic": "grad_norm", "every": 75, "keep": 0.25, "batches": 4,
          "shortcuts_mode": "combined"}  # fmt: skip
SHORTCUTS = {"kinds": ["residual1", "residual2", "shortcut1", "shortcut2"], "r": 8, "alpha": 16.0}
RESULTS = REPO / "docs" / "data" / "hetero_search.json"
REPORT = REPO / "docs" / "hetero-search.md"


def variant_config(task_name: str, variant: str, seed: int, learning_rate: float, output_dir: Path) -> dict[str, Any]:
    task = next(t for t in cpu_profile().tasks if t.name == task_name)
    allocation = dict(SEARCH)
    if variant == "switched_on":
        allocation["scoring"] = "switched_on"
    method = Method(f"hetero-{variant}", variant, 2, {"lora": _lora(8), "allocation": allocation})
    config = run_config(task, method, learning_rate, seed, str(output_dir))
    config["shortcuts"] = dict(SHORTCUTS)
    config["training"]["eval_steps"] = config["training"]["max_steps"]  # validation once, at the end
    return config


def run_one(task_name: str, variant: str, seed: int, learning_rate: float, work: Path, before: Path) -> dict[str, Any]:
    """Trains one variant in a subprocess (one thread), scores the test file, returns its record."""
    task = next(t for t in cpu_profile().tasks if t.name == task_name)
    folder = work / task_name / f"{variant}-lr{learning_rate:g}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder.parent / f"{folder.name}.yaml"  # not with_suffix: the name holds the learning rate's dot
    config_path.write_text(json.dumps(variant_config(task_name, variant, seed, learning_rate, folder)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if variant == "before":
        env["PYTHONPATH"] = str(before / "src")  # ahead of the editable install's path
    command = [sys.executable, "-m", "ranktune"]
    with (folder.parent / f"{folder.name}.log").open("w") as log:
        subprocess.run([*command, "train", str(config_path), "--overwrite"], env=env, stdout=log, stderr=log,
                       check=True)  # fmt: skip
        argv = ["eval", str(folder), "--data", assets.resolve(task.test), "--json", "--batch-size", "64"]
        if task.test_samples:
            argv += ["--max-samples", str(task.test_samples)]
        test = subprocess.run([*command, *argv], env=env, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in (folder / "reallocation_history.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    validation = [m["eval_accuracy"] for m in metrics if "eval_accuracy" in m]
    return {
        "task": task_name,
        "variant": variant,
        "seed": seed,
        "learning_rate": learning_rate,
        "reallocations": reallocation_changes(rows),
        "validation_accuracy": validation[-1],
        "test_accuracy": json.loads(test.stdout.strip().splitlines()[-1])["accuracy"],
    }


def report(records: list[dict[str, Any]], before: str) -> str:
    lines = [
        "# Does HeteroLoRA's dynamic search change its mind?",
        "",
        "Written by `python -m benchmarks.hetero_search` (see its docstring for the setting): MiniLM-L6, LoRA r 8 on "
        "every linear layer plus the four shortcut kinds (60 candidates), grad_norm over 4 batches, keep 0.25, a "
        f"reallocation every 75 of 300 steps. `before` is ranktune at {before}.",
        "",
        "| task | learning rate | variant | seed | enabled | switched on/off at each reallocation after the first "
        "| validation accuracy | test accuracy |",
        "|---|---:|---|---:|---:|---|---:|---:|",
    ]
    order = sorted(records, key=lambda r: (r["task"], -r["learning_rate"], VARIANTS.index(r["variant"]), r["seed"]))
    for r in order:
        moves = ", ".join(f"+{c['switched_on']}/-{c['switched_off']}" for c in r["reallocations"][1:])
        enabled = r["reallocations"][0]["enabled"]
        lines.append(
            f"| {r['task']} | {r['learning_rate']:g} | {r['variant']} | {r['seed']} | {enabled} | {moves} "
            f"| {r['validation_accuracy']:.4f} | {r['test_accuracy']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--learning-rates", type=float, nargs="+", default=list(LEARNING_RATES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--before", default="b093f7b", help="the revision `before` runs (a git worktree of it)")
    parser.add_argument("--work", default="runs/hetero-search")
    args = parser.parse_args(argv)

    worktree = Path(f"/tmp/ranktune-before-{args.before}")
    if "before" in args.variants and not worktree.exists():
        subprocess.run(["git", "worktree", "add", "-f", str(worktree), args.before], cwd=REPO, check=True)
    done = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    for record in done:  # the first records predate the learning-rate option
        record.setdefault("learning_rate", LEARNING_RATES[0])
    have = {(r["task"], r["variant"], r["seed"], r["learning_rate"]) for r in done}
    todo = [(t, v, s, lr) for lr in args.learning_rates for t in args.tasks for v in args.variants
            for s in args.seeds if (t, v, s, lr) not in have]  # fmt: skip
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, t, v, s, lr, Path(args.work), worktree) for t, v, s, lr in todo]
        for future in futures:
            record = future.result()
            done.append(record)
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(done, indent=1) + "\n")
            print(json.dumps(record), flush=True)
    REPORT.write_text(report(done, args.before))
    print(f"wrote {REPORT}")


if __name__ == "__main__":
    main()
