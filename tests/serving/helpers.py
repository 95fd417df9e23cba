"""Heterogeneous PEFT adapters on tiny models, made with PEFT itself: the inputs every serving form is checked on."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from tests.conftest import save_tiny_model

INPUT_IDS = torch.tensor([[9, 20, 31, 42, 53, 64, 75, 86], [12, 14, 16, 18, 20, 22, 24, 26]])


def heterogeneous_adapter(
    folder: Path, rslora: bool = False, skip_layer_1_down: bool = False, rank_pattern: dict[str, int] | None = None
) -> tuple[Path, Path]:
    """(base model folder, adapter folder): tiny llama, LoRA on q, k, v, down with ranks 2-6 and scales 0.5-3 set
    through suffix and exact keys of rank_pattern and alpha_pattern, random B so the adapter does something."""
    model_dir = folder / "base"
    if not (model_dir / "config.json").is_file():
        save_tiny_model(model_dir, "llama")
    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        exclude_modules=["model.layers.1.mlp.down_proj"] if skip_layer_1_down else None,
        rank_pattern=rank_pattern or {"q_proj": 2, "model.layers.0.mlp.down_proj": 6},
        alpha_pattern={"v_proj": 2.0, "model.layers.0.mlp.down_proj": 18.0},
        use_rslora=rslora,
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    suffix = "" if rank_pattern is None else "-" + "-".join(map(str, rank_pattern.values()))
    adapter_dir = folder / f"adapter{suffix}"
    model.save_pretrained(adapter_dir)
    for tokenizer_file in model_dir.glob("tokenizer*"):  # as `ranktune train` saves the tokenizer beside the adapter
        shutil.copyfile(tokenizer_file, adapter_dir / tokenizer_file.name)
    return model_dir, adapter_dir


def logits(model_dir: Path, adapter_dir: Path | None) -> torch.Tensor:
    """Vanilla transformers + PEFT logits on a fixed input (no adapter: the base model's)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(input_ids=INPUT_IDS).logits
