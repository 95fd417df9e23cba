"""One L1RA, AdaLoRA, HeteroLoRA or EVA training process, alone or under torchrun; dumps its final allocation state.

Usage: python allocation_worker.py l1ra|adalora|hetero|eva|gradient MODEL_DIR OUT_DIR PER_DEVICE_BATCH
"""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from peft import AdaLoraConfig, LoraConfig, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from ranktune import L1RAConfig, L1RATrainer
from ranktune.adapters.shortcut_types import ShortcutSpec
from ranktune.adapters.shortcuts import install_shortcuts
from ranktune.allocation.adalora import AdaLoRASettings, AdaLoRAStrategy
from ranktune.allocation.callback import AllocationCallback
from ranktune.allocation.components import install_gates
from ranktune.allocation.hetero import HeteroSettings, HeteroStrategy
from ranktune.allocation.registry import BuildContext
from ranktune.config import SHORTCUT_KINDS

BLOCK = 24


def blocks(tokenizer) -> Dataset:
    """Fixed-length blocks, so every example has the same token count and per-process losses average exactly."""
    text = " ".join(f"the {w} fox jumps over the lazy dog {i}" for i, w in enumerate(["quick", "slow", "red"] * 30))
    ids = tokenizer(text).input_ids
    return Dataset.from_list([{"input_ids": ids[i : i + BLOCK]} for i in range(0, len(ids) - BLOCK, BLOCK)][:64])


def l1ra(model, args: TrainingArguments, common: dict) -> dict:
    config = L1RAConfig(
        task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        l1ra_lambda=3.0, eta_c=0.05, rank_update_ratio=0.125, max_rank=8,
    )  # fmt: skip
    trainer = L1RATrainer(model=model, args=args, peft_config=config, **common)
    trainer.train()
    return {
        m.name: {
            "mask": m.lora_A.lora_mask.clone(),
            "gate": m.lora_A.lora_gate.detach().clone(),
            "A": m.lora_A.weight.detach().clone(),
            "B": m.lora_B.weight.detach().clone(),
        }
        for m in trainer.l1ra.strategy.modules
    }


def adalora(model, args: TrainingArguments, common: dict) -> dict:
    """PEFT's AdaLoRA on transformers' Trainer, driven by ranktune's strategy and callback."""
    settings = AdaLoRASettings(init_r=6, target_r=3, tinit=3, tfinal=4, deltaT=2)
    config = AdaLoraConfig(
        task_type=TaskType.CAUSAL_LM, init_r=6, target_r=3, lora_alpha=8, lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"], tinit=3, tfinal=4, deltaT=2, total_step=16,
    )  # fmt: skip
    model = get_peft_model(model, config)
    strategy = AdaLoRAStrategy(model, settings)
    Trainer(model=model, args=args, callbacks=[AllocationCallback(strategy)], **common).train()
    return {
        name: {
            "mask": layer.lora_E["default"].detach().flatten() != 0,
            "gate": layer.lora_E["default"].detach().clone(),
            "A": layer.lora_A["default"].detach().clone(),
            "B": layer.lora_B["default"].detach().clone(),
        }
        for name, layer in strategy.layers.items()
    }


def hetero(model, args: TrainingArguments, common: dict) -> dict:
    """HeteroLoRA's offline dynamic search (grad_norm over 4 batches every 4 steps) over LoRA modules and shortcut
    connections (rank 4 each, one pool) on transformers' Trainer."""
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj", "down_proj"]))  # fmt: skip
    modules = install_gates(model, 4)
    specs = {(i, kind): ShortcutSpec(4, 8.0, 0.0) for i in range(2) for kind in SHORTCUT_KINDS}
    shortcuts = install_shortcuts(model, {key: spec for key, spec in specs.items() if key != (0, "shortcut2")})
    context = BuildContext(args, common["train_dataset"], common["data_collator"], Path(args.output_dir), seed=0)
    settings = HeteroSettings(heuristic="grad_norm", every=4, keep=0.5, batches=4, shortcuts_mode="combined")

    def draw(step: int) -> list:  # fresh rows at every reallocation, the same on every process
        return context.sampled_batches(settings.batches, draw=step)

    strategy = HeteroStrategy(model, modules, settings, draw, steps_per_epoch=16, seed=0, shortcuts=shortcuts)
    Trainer(model=model, args=args, callbacks=[AllocationCallback(strategy)], **common).train()
    state = {
        m.name: {
            "mask": m.lora_A.lora_mask.clone(),
            "gate": torch.tensor([strategy.scores[m.name]]),
            "A": m.lora_A.weight.detach().clone(),
            "B": m.lora_B.weight.detach().clone(),
        }
        for m in modules
    }
    for name, connection in shortcuts.named_connections():
        state[name] = {
            "mask": torch.full((4,), connection.enabled),
            "gate": torch.tensor([strategy.scores[name]]),
            "A": connection.A.detach().clone(),
            "B": connection.B.detach().clone(),
        }
    return state


def before_step_zero(allocation: dict, model, args: TrainingArguments, common: dict) -> dict:
    """A method that sets ranks from calibration batches, through the registry's builder as `ranktune train` builds
    it: 4 batches shared out among the processes (EVA gathers their inputs, the gradient method sums their
    gradients); then 16 training steps."""
    from ranktune.allocation.registry import BuildContext, build_adapter
    from ranktune.config import validate_config

    config = validate_config({
        "model": {"name_or_path": "unused"}, "data": {"train": "unused"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "allocation": allocation,
    })  # fmt: skip
    context = BuildContext(args, common["train_dataset"], common["data_collator"], Path(args.output_dir), seed=0)
    adapted = build_adapter(model, config, context)
    Trainer(model=adapted.model, args=args, callbacks=[AllocationCallback(adapted.strategy)], **common).train()
    return {
        name: {
            "mask": torch.ones(int(layer.r["default"]), dtype=torch.bool),
            "gate": torch.ones(int(layer.r["default"])),
            "A": layer.lora_A["default"].weight.detach().clone(),
            "B": layer.lora_B["default"].weight.detach().clone(),
        }
        for name, layer in adapted.strategy.layers.items()
    }


def main(method: str, model_dir: str, out_dir: str, batch: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch, max_steps=16, learning_rate=5e-3, seed=0,
        train_sampling_strategy="sequential", save_strategy="no", report_to="none",
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,
        logging_steps=4, use_cpu=True,
    )  # fmt: skip
    common = {
        "train_dataset": blocks(tokenizer),
        "data_collator": DataCollatorForLanguageModeling(tokenizer, mlm=False),
        "processing_class": tokenizer,
    }
    methods = {
        "l1ra": l1ra, "adalora": adalora, "hetero": hetero,
        "eva": partial(before_step_zero, {"method": "eva", "rho": 2.0, "batches": 4}),
        "gradient": partial(before_step_zero, {"method": "gradient", "rho": 2.0, "batches": 4}),
    }  # fmt: skip
    state = methods[method](model, args, common)
    torch.save(state, Path(out_dir) / f"state-{int(os.environ.get('RANK', '0'))}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
