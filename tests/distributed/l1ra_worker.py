"""One L1RA training process; run alone or under torchrun. Dumps this process's final allocation state.

Usage: python l1ra_worker.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import TaskType
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, TrainingArguments

from ranktune import L1RAConfig, L1RATrainer

BLOCK = 24


def blocks(tokenizer) -> Dataset:
    """Fixed-length blocks, so every example has the same token count and per-process losses average exactly."""
    text = " ".join(f"the {w} fox jumps over the lazy dog {i}" for i, w in enumerate(["quick", "slow", "red"] * 30))
    ids = tokenizer(text).input_ids
    return Dataset.from_list([{"input_ids": ids[i : i + BLOCK]} for i in range(0, len(ids) - BLOCK, BLOCK)][:64])


def main(model_dir: str, out_dir: str, batch: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = L1RAConfig(
        task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        l1ra_lambda=3.0, eta_c=0.05, rank_update_ratio=0.125, max_rank=8,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch, max_steps=16, learning_rate=5e-3, seed=0,
        train_sampling_strategy="sequential", save_strategy="no", report_to="none",
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        logging_steps=4, use_cpu=True,
    )  # fmt: skip
    trainer = L1RATrainer(
        model=model, args=args, train_dataset=blocks(tokenizer), peft_config=config,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    state = {
        m.name: {
            "mask": m.lora_A.lora_mask.clone(),
            "gate": m.lora_A.lora_gate.detach().clone(),
            "A": m.lora_A.weight.detach().clone(),
            "B": m.lora_B.weight.detach().clone(),
        }
        for m in trainer.l1ra.strategy.modules
    }
    torch.save(state, Path(out_dir) / f"state-{int(os.environ.get('RANK', '0'))}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
