"""Step time and peak memory of ranktune's methods against PEFT LoRA on a plain transformers Trainer.

Each (variant, repetition) runs in its own process, so peak memory is per variant; repetitions are interleaved
(A B C A B C ...) so drift in machine load hits every variant alike. Reports the median step time over the timed
steps of all repetitions and the median peak memory (CUDA: max allocated; CPU: max resident set size), each with its
ratio to the baseline. The mean step time is reported too: HeteroLoRA's offline scoring runs inside the steps that
reallocate, which a median hides. Writes the `overhead` section of docs/benchmarks.md and docs/data/overhead.json.

    python -m benchmarks.overhead [--models tiny smollm2-135m] [--steps N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import StepTimer, bf16_available, machine, peak_memory_mib, run_worker, update_section

VARIANTS = (
    "peft-lora-baseline",
    "ranktune-lora",
    "ranktune-l1ra",
    "ranktune-adalora",
    "ranktune-hetero-online",
    "ranktune-hetero-offline",
)
ALLOCATIONS = {
    "ranktune-lora": {"method": "none"},
    "ranktune-l1ra": {"method": "l1ra"},
    "ranktune-adalora": {"method": "adalora", "init_r": 8, "target_r": 4},  # the same initial r as the others
    "ranktune-hetero-online": {"method": "hetero", "online": True},  # default schedule: every 0.2 epoch, keep 0.25
    "ranktune-hetero-offline": {"method": "hetero"},  # grad_norm over `batches` extra passes per reallocation
}
SHAPES = {"tiny": (8, 128), "smollm2-135m": (4, 256)}  # (batch, sequence length)
DEFAULT_STEPS = {"tiny": 40, "smollm2-135m": 12}  # a tiny step takes ~0.25 s on 2 cores: more of them beat noise
DEFAULT_REPEATS = {"tiny": 3, "smollm2-135m": 2}
# Offline scoring passes per reallocation: the default 32 on the tiny model; 4 on SmolLM2, where 32 would add about
# three CPU-minutes per reallocation. Its cost grows linearly with this number.
OFFLINE_BATCHES = {"tiny": 32, "smollm2-135m": 4}
WARMUP_STEPS = 2


def build_model(name: str, folder: Path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    if name == "tiny":
        config = LlamaConfig(
            vocab_size=2048,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=512,
        )
        return AutoModelForCausalLM.from_config(config)
    from ranktune import assets

    return AutoModelForCausalLM.from_pretrained(assets.fetch(name))


def measure(variant: str, model_name: str, steps: int, out: Path) -> dict:
    """One process: builds the variant, trains `steps` optimizer steps, returns step times and peak memory."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    batch, length = SHAPES[model_name]
    model = build_model(model_name, out)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (batch * steps, length), generator=generator)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-4, report_to="none", save_strategy="no", logging_steps=10**6,
                             bf16=bf16_available(),
                             train_sampling_strategy="sequential", disable_tqdm=True,
                             ddp_find_unused_parameters=False)  # fmt: skip
    callbacks: list = []
    if variant == "peft-lora-baseline":
        model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16,
                                                 target_modules="all-linear"))  # fmt: skip
    else:
        from ranktune.allocation.callback import AllocationCallback
        from ranktune.allocation.registry import BuildContext, build_adapter
        from ranktune.config import validate_config
        from ranktune.training.callbacks import MetricsLogger, StopOnSignal

        allocation = dict(ALLOCATIONS[variant])
        if variant == "ranktune-hetero-offline":
            allocation["batches"] = OFFLINE_BATCHES[model_name]
        config = validate_config({"model": {"name_or_path": "x"}, "data": {"train": "x"},
                                  "allocation": allocation,
                                  "lora": {"r": 8, "alpha": 16, "dropout": 0.0}})  # fmt: skip
        adapted = build_adapter(model, config, BuildContext(args, data, default_data_collator, out, seed=42))
        model = adapted.model
        callbacks = [StopOnSignal(), MetricsLogger(out / "metrics.jsonl", causal_lm=True)]
        if adapted.strategy is not None:
            callbacks.insert(0, AllocationCallback(adapted.strategy, out / "rank_history.jsonl"))
    if variant == "peft-lora-baseline":
        model.base_model.model.config.use_cache = False
    timer = StepTimer()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[*callbacks, timer]).train()
    return {"times": timer.times[WARMUP_STEPS:], "peak_mib": peak_memory_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: 40 tiny, 12 smollm2-135m)")
    parser.add_argument("--repeats", type=int, help="repetitions per variant (default: 3 tiny, 2 smollm2-135m)")
    parser.add_argument("--doc", default="docs/benchmarks.md")
    parser.add_argument("--data-out", default="docs/data/overhead.json")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as folder:
            steps = args.steps or DEFAULT_STEPS[args.worker[1]]
            print(json.dumps(measure(args.worker[0], args.worker[1], steps, Path(folder))))
        return
    lines = [
        "## Overhead: ranktune's methods against PEFT LoRA",
        "",
        "Written by `python -m benchmarks.overhead`. Median optimizer-step time (after "
        f"{WARMUP_STEPS} warm-up steps) and peak memory per variant; every (variant, repetition) runs in its own "
        "process and repetitions are interleaved. LoRA r 8, alpha 16, all-linear; L1RA with default settings "
        "(capacity 2 x r); AdaLoRA (PEFT's layers) with init_r 8, target_r 4 and ranktune's default schedule; "
        "HeteroLoRA's dynamic search over the r-8 pool with its default schedule (reallocate every 0.2 epoch, keep "
        "0.25; one epoch = the benchmark's steps), scored online from the training gradients or offline by grad_norm "
        f"over extra batches ({OFFLINE_BATCHES['tiny']} on the tiny model, {OFFLINE_BATCHES['smollm2-135m']} on "
        "SmolLM2-135M). The median step hides the offline scoring, which runs inside the reallocating steps; the "
        "mean step includes it. The repetition medians show the run-to-run noise of the machine: read ratios within "
        "that band as equal. Peak memory is CUDA's max allocated on a GPU, the process's peak resident set on a CPU "
        "(model included).",
        "",
        f"Machine: {machine()}.",
        "",
    ]
    measured: dict[str, dict[str, list[dict]]] = {}
    for model_name in args.models:
        steps = args.steps or DEFAULT_STEPS[model_name]
        repeats = args.repeats or DEFAULT_REPEATS[model_name]
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for repeat in range(repeats):
            for variant in VARIANTS:
                print(f"[{model_name}] repetition {repeat + 1}/{repeats}: {variant}", file=sys.stderr, flush=True)
                results[variant].append(run_worker("benchmarks.overhead", variant, model_name, "--steps", str(steps)))
        measured[model_name] = results
        lines += [*model_table(model_name, results, steps, repeats), ""]
        print("\n".join(lines[-len(VARIANTS) - 5 :]), flush=True)
    Path(args.data_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.data_out).write_text(json.dumps({"machine": machine(), "results": measured}, indent=1) + "\n")
    section = "\n".join(lines)
    print(f"written: {update_section('overhead', section, Path(args.doc))}, {args.data_out}")


def model_table(model_name: str, results: dict[str, list[dict]], steps: int, repeats: int) -> list[str]:
    """The markdown table of one model: each variant's step time and peak memory, with ratios to the baseline."""
    batch, length = SHAPES[model_name]
    lines = [
        f"### {model_name} (batch {batch}, sequence length {length}, {steps} steps x {repeats})",
        "",
        "| variant | median step (s) | ratio | mean step (s) | ratio | repetition medians (s) "
        "| peak memory (MiB) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_time = base_mean = base_peak = 0.0
    for variant in VARIANTS:
        times = [t for r in results[variant] for t in r["times"]]
        step, mean = statistics.median(times), statistics.fmean(times)
        peak = statistics.median(r["peak_mib"] for r in results[variant])
        if variant == VARIANTS[0]:
            base_time, base_mean, base_peak = step, mean, peak
        spread = ", ".join(f"{statistics.median(r['times']):.4f}" for r in results[variant])
        ratios = (
            f"{step / base_time:.3f}x | {mean:.4f} | {mean / base_mean:.3f}x | {spread} | {peak:.0f} "
            f"| {peak / base_peak:.3f}x"
        )
        lines.append(f"| {variant} | {step:.4f} | {ratios} |")
    return lines


if __name__ == "__main__":
    main()
