"""Packing against padding every example to a fixed length, on the SFT data: useful tokens per second and the
wall time of an epoch.

Three ways to lay the same chat examples (the Q&A pairs, as examples/sft_smollm2_chat.yaml trains on them) into
batches of the same number of rows, trained with the same LoRA on the same model:
- `pad-to-512`: one example per row, every row padded to 512 tokens, as the training script in seed 003 does;
- `dynamic-padding`: one example per row, padded to the longest row of its batch, rows of similar length batched
  together (ranktune's default without packing);
- `packing`: several examples per 512-token row, kept apart by position ids (ranktune's `data.packing: true`).
Useful tokens are the examples' own tokens (no padding). Each variant runs in its own process; the epoch time is
the epoch's useful tokens divided by the measured useful tokens per second (a CPU cannot afford a padded epoch).
Length-grouped batches come in groups of 50 (sorted by length inside a random group), so dynamic padding is timed
over one whole group, a fair sample of the data, rather than over its first, longest batches.
Writes the `throughput` section of docs/benchmarks.md and docs/data/throughput.json.

    python -m benchmarks.throughput [--model asset:smollm2-135m] [--data FILE] [--steps N] [--batch N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from benchmarks.common import StepTimer, bf16_available, machine, peak_memory_mib, run_worker, update_section

VARIANTS = ("pad-to-512", "dynamic-padding", "packing")
LENGTH = 512
WARMUP_STEPS = 1
LENGTH_GROUP = 50  # batches per group of transformers' length-grouped sampler (its megabatch)


class FixedLengthCollator:
    """Pads every row to `length` (what `padding="max_length"` does) and counts the useful tokens of each batch."""

    def __init__(self, pad_token_id: int, length: int) -> None:
        self.pad_token_id = pad_token_id
        self.length = length
        self.useful_tokens: list[int] = []

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = len(features)
        input_ids = torch.full((rows, self.length), self.pad_token_id, dtype=torch.long)  # (B, L)
        labels = torch.full((rows, self.length), -100, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((rows, self.length), dtype=torch.long)  # (B, L)
        for i, row in enumerate(features):
            size = min(len(row["input_ids"]), self.length)
            input_ids[i, :size] = torch.as_tensor(row["input_ids"][:size])
            labels[i, :size] = torch.as_tensor(row["labels"][:size])
            attention_mask[i, :size] = 1
        self.useful_tokens.append(int(attention_mask.sum()))
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class CountingCollator:
    """Wraps a collator and records the useful (unpadded) tokens of every batch it builds."""

    def __init__(self, collator: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]) -> None:
        self.collator = collator
        self.useful_tokens: list[int] = []

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self.useful_tokens.append(sum(len(row["input_ids"]) for row in features))
        return self.collator(features)


def prepare_rows(model_path: str, data: str, tokenizer: PreTrainedTokenizerBase, packing: bool) -> Dataset:
    """The SFT rows as ranktune builds them: chat format, loss on assistant turns, packed or one example per row."""
    from datasets import DatasetDict
    from transformers import AutoConfig

    from ranktune import assets
    from ranktune.config import DataConfig
    from ranktune.data import load_file, prepare_causal_lm

    config = DataConfig(train=assets.resolve(data), format="chat", max_length=LENGTH, packing=packing)
    model_type = AutoConfig.from_pretrained(model_path).model_type
    splits = DatasetDict({"train": load_file(config.train)})
    return prepare_causal_lm(splits, tokenizer, config, model_type=model_type)["train"]


def measure(variant: str, model: str, data: str, steps: int, batch: int, out: Path) -> dict[str, Any]:
    """One process: trains `steps` optimizer steps of one variant; returns step times, tokens and epoch size."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from ranktune.config import ModelConfig
    from ranktune.data import build_collator
    from ranktune.models import load_tokenizer, resolve_model_path

    model_path = resolve_model_path(model)
    tokenizer = load_tokenizer(model_path, ModelConfig(name_or_path=model_path))
    packing = variant == "packing"
    rows = prepare_rows(model_path, data, tokenizer, packing)
    if variant == "pad-to-512":
        collator = FixedLengthCollator(tokenizer.pad_token_id, LENGTH)
    else:
        collator = CountingCollator(build_collator(tokenizer, "causal_lm", packing=packing))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_path)
    base.config.use_cache = False
    peft_model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules="all-linear"))  # fmt: skip
    sampling = "group_by_length" if variant == "dynamic-padding" else "random"
    if variant == "dynamic-padding":
        steps = LENGTH_GROUP
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps + WARMUP_STEPS,
                             learning_rate=2e-4, report_to="none", save_strategy="no", logging_steps=10**6,
                             bf16=bf16_available(),
                             disable_tqdm=True, remove_unused_columns=False, train_sampling_strategy=sampling,
                             seed=0, dataloader_pin_memory=False)  # fmt: skip
    timer = StepTimer()
    Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collator, callbacks=[timer]).train()
    epoch_tokens = sum(len(ids) for ids in rows["input_ids"])
    return {
        "times": timer.times[WARMUP_STEPS:],
        "useful_tokens": collator.useful_tokens[WARMUP_STEPS : WARMUP_STEPS + steps],
        "rows": len(rows),
        "epoch_tokens": epoch_tokens,
        "peak_mib": peak_memory_mib(),
    }


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """Useful tokens per second over the timed steps, and the epoch those numbers imply."""
    seconds = sum(result["times"])
    tokens_per_second = sum(result["useful_tokens"]) / seconds
    return {
        "median_step": statistics.median(result["times"]),
        "useful_per_step": statistics.fmean(result["useful_tokens"]),
        "tokens_per_second": tokens_per_second,
        "epoch_seconds": result["epoch_tokens"] / tokens_per_second,
        "peak_mib": result["peak_mib"],
    }


def render(results: dict[str, dict[str, Any]], model: str, steps: int, batch: int) -> str:
    """The markdown section: one row per variant, ratios against padding to 512."""
    summaries = {variant: summarize(results[variant]) for variant in VARIANTS}
    base = summaries["pad-to-512"]
    lines = [
        "## Throughput: packing against padding to 512 tokens",
        "",
        "Written by `python -m benchmarks.throughput`. The training split of the Q&A pairs as chat messages (as "
        f"examples/sft_smollm2_chat.yaml trains on them; {results['pad-to-512']['rows']:,} examples) on {model} "
        f"with LoRA r 16 on all linear layers, {batch} rows per step, each variant in its own process, "
        f"{WARMUP_STEPS} warm-up step then {steps} timed steps ({LENGTH_GROUP} for dynamic padding: one whole "
        "length-sorted group of batches, so short and long batches are both timed). *Useful tokens* are the "
        "examples' own tokens, never padding. The epoch time is the epoch's useful tokens divided by the measured "
        "useful tokens per second.",
        "",
        f"Machine: {machine()}.",
        "",
        "| variant | rows per epoch | median step (s) | useful tokens per step | useful tokens / s | speed-up "
        "| epoch (min) | epoch ratio | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        s = summaries[variant]
        epoch_ratio = s["epoch_seconds"] / base["epoch_seconds"]
        lines.append(
            f"| {variant} | {results[variant]['rows']:,} | {s['median_step']:.3f} | {s['useful_per_step']:.0f} "
            f"| {s['tokens_per_second']:.0f} | {s['tokens_per_second'] / base['tokens_per_second']:.2f}x "
            f"| {s['epoch_seconds'] / 60:.1f} | {epoch_ratio:.3f}x | {s['peak_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="asset:smollm2-135m", help="a model folder or asset:NAME")
    parser.add_argument("--data", default="asset:chatterbot-qa/train.jsonl", help="chat rows with a messages column")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant (6)")
    parser.add_argument("--batch", type=int, default=4, help="rows per step (4)")
    parser.add_argument("--doc", default="docs/benchmarks.md")
    parser.add_argument("--data-out", default="docs/data/throughput.json")
    parser.add_argument("--worker", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be at least 1")
    if args.worker:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(measure(args.worker, args.model, args.data, args.steps, args.batch, Path(folder))))
        return
    results = {}
    for variant in VARIANTS:
        steps = LENGTH_GROUP if variant == "dynamic-padding" else args.steps
        print(f"[throughput] {variant}: {steps} timed steps of {args.batch} rows", file=sys.stderr, flush=True)
        results[variant] = run_worker("benchmarks.throughput", variant, "--model", args.model, "--data", args.data,
                                      "--steps", str(args.steps), "--batch", str(args.batch))  # fmt: skip
    section = render(results, args.model, args.steps, args.batch)
    print(section)
    Path(args.data_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.data_out).write_text(json.dumps({"machine": machine(), "results": results}, indent=1) + "\n")
    print(f"written: {update_section('throughput', section, Path(args.doc))}, {args.data_out}")


if __name__ == "__main__":
    main()
