"""Step time of every allocation method under FSDP2 against plain LoRA under FSDP2: 2 processes on CPU (gloo).

Each (method, repetition) is a `torchrun --nproc_per_node 2` run of `ranktune train` through
`benchmarks/fsdp_on_cpu.py`, which makes accelerate apply its real FSDP2 path on CPU (base weights sharded as
DTensors, all-gathered in forward and backward; the adapter whole on every process, its gradients all-reduced).
Repetitions are interleaved (A B C ... A B C) so that drift in machine load hits every method alike. Reports, per
method, the median optimizer-step time after the warm-up steps (the steady state: LoRA's and the gates' compute and
communication) and the mean over every step after warm-up (which includes reallocation steps: HeteroLoRA's offline
scoring passes, AdaLoRA's and L1RA's rank updates), each with its ratio to plain LoRA, and the repetition medians as
the noise band. Calibration before step 0 (EVA, the gradient method) is not a step and is not counted. Writes the
`fsdp` section of docs/benchmarks.md and docs/data/fsdp_overhead.json.

    python -m benchmarks.fsdp_overhead [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine, update_section

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "benchmarks" / "fsdp_on_cpu.py"
METHODS = {
    "none": {"method": "none"},
    "l1ra": {"method": "l1ra"},
    "adalora": {"method": "adalora", "init_r": 8, "target_r": 4},
    "hetero (offline grad_norm)": {"method": "hetero", "every": 10, "batches": 4},
    "eva": {"method": "eva", "rho": 2.0, "batches": 16},  # fewer do not converge at r 8 on this model
    "gradient": {"method": "gradient", "rho": 2.0, "batches": 4},
    "gradient + l1ra": {"method": "l1ra", "start": {"method": "gradient", "rho": 2.0, "batches": 4}},
}
WARMUP_STEPS = 2
BATCH, LENGTH = 4, 64  # per process


def write_inputs(folder: Path) -> Path:
    """A tiny llama (4 layers, hidden 256) with a character tokenizer, its training rows and the run's config."""
    from benchmarks.overhead import build_model
    from tests.conftest import build_tokenizer

    model_dir = folder / "model"
    build_model("tiny", model_dir).save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    words = ["quick", "slow", "red", "blue", "green", "lazy", "bright", "dark"]
    rows = [{"text": " ".join(words[(i * 7 + j) % 8] for j in range(40))} for i in range(2000)]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "model": {"name_or_path": str(model_dir), "task": "causal_lm"},
        "data": {"train": str(folder / "train.jsonl"), "text_column": "text", "max_length": LENGTH},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {"per_device_train_batch_size": BATCH, "learning_rate": 1e-3, "save_strategy": "no",
                     "logging_steps": 1000, "disable_tqdm": True, "use_cpu": True,
                     "fsdp": True, "fsdp_config": {"fsdp_version": 2}},
    }  # fmt: skip
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))
    return path


def measure(config: Path, method: str, steps: int, folder: Path, port: int) -> list[float]:
    """One 2-process FSDP2 run; process 0's optimizer-step times after the warm-up steps."""
    out = folder / "out"
    out.mkdir(parents=True, exist_ok=True)
    allocation = json.dumps(METHODS[method])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(LAUNCHER), str(out), "train", str(config), f"output_dir={folder / 'adapter'}",
        f"training.max_steps={steps}", f"allocation={allocation}", "--overwrite",
    ]  # fmt: skip
    env = {**os.environ, "RANKTUNE_STEP_TIMES": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the FSDP2 run of {method} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "steps-0.json").read_text())[WARMUP_STEPS:]


def table(results: dict[str, list[list[float]]], steps: int, repeats: int) -> list[str]:
    lines = [
        f"### tiny llama (4 layers, hidden 256), 2 processes x batch {BATCH}, sequence length {LENGTH}, {steps} steps "
        f"x {repeats}",
        "",
        "| method | median step (s) | ratio to LoRA | mean step (s) | ratio to LoRA | repetition medians (s) |",
        "|---|---|---|---|---|---|",
    ]
    base = results["none"]
    base_median = statistics.median(t for run in base for t in run)
    base_mean = statistics.fmean(t for run in base for t in run)
    for method, runs in results.items():
        times = [t for run in runs for t in run]
        median, mean = statistics.median(times), statistics.fmean(times)
        spread = ", ".join(f"{statistics.median(run):.4f}" for run in runs)
        lines.append(f"| {method} | {median:.4f} | {median / base_median:.3f}x | {mean:.4f} | {mean / base_mean:.3f}x "
                     f"| {spread} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--doc", default="docs/benchmarks.md")
    parser.add_argument("--data-out", default="docs/data/fsdp_overhead.json")
    args = parser.parse_args()
    if "none" not in args.methods:
        parser.error("--methods: include none, the baseline every ratio is taken against")
    results: dict[str, list[list[float]]] = {method: [] for method in METHODS if method in args.methods}
    with tempfile.TemporaryDirectory() as work:
        config = write_inputs(Path(work))
        for repeat in range(args.repeats):
            for index, method in enumerate(results):
                print(f"repetition {repeat + 1}/{args.repeats}: {method}", file=sys.stderr, flush=True)
                folder = Path(work) / f"{index}-{repeat}"
                results[method].append(measure(config, method, args.steps, folder, 29700 + index))
    lines = [
        "## FSDP2: each method's step time against plain LoRA",
        "",
        "Written by `python -m benchmarks.fsdp_overhead` (its docstring has the method). LoRA r 8, alpha 16, "
        "all-linear; the methods' settings are in the script. The median step is the steady state; the mean step "
        "includes the steps that reallocate (HeteroLoRA scores 4 extra batches every 10 steps here). The repetition "
        "medians show the machine's noise: read ratios within that band as equal. On a CPU the two processes share "
        "the cores, so absolute times say nothing about GPUs; the ratios show what each method adds to a sharded step.",
        "",
        f"Machine: {machine()}.",
        "",
        *table(results, args.steps, args.repeats),
    ]
    print("\n".join(lines), flush=True)
    Path(args.data_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.data_out).write_text(json.dumps({"machine": machine(), "steps": args.steps, "results": results}) + "\n")
    section = "\n".join(lines)
    print(f"written: {update_section('fsdp', section, Path(args.doc))}, {args.data_out}")


if __name__ == "__main__":
    main()
