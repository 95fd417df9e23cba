"""Writing a finished adapter into output_dir in vanilla PEFT format, never half-written.

Plain LoRA is saved by PEFT itself. Gated (adaptive-rank) modules are exported in the canonical heterogeneous form:
each module's gate and scaling are folded into its weights, inactive components and rank-0 modules are dropped, and
`r = lora_alpha = max rank` with `rank_pattern = alpha_pattern = {module: rank}`, so every scaling is exactly 1.0 and
any PEFT-reading tool loads it.

PEFT recognises an adapter folder by its adapter_config.json, so that file is moved in last, after the weights and
the tokenizer; a crash before then leaves no adapter_config.json and nothing that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from ranktune.adapters.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ranktune.allocation.components import GatedModule
from ranktune.errors import RuntimeFailure


def gated_adapter(model: PeftModel, modules: list[GatedModule]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and adapter_config of the vanilla LoRA adapter equivalent to a gated model.

    Returns:
        (tensors keyed as PEFT saves them, the adapter_config dict).
    """
    tensors = get_peft_model_state_dict(model)
    ranks: dict[str, int] = {}
    with torch.no_grad():
        for module in modules:
            prefix = f"base_model.model.{module.name}"
            for suffix in ("lora_A.weight", "lora_A.lora_gate", "lora_A.lora_mask", "lora_B.weight"):
                tensors.pop(f"{prefix}.{suffix}", None)
            index = module.lora_A.active_index
            if index.numel() == 0:
                continue
            gate = module.lora_A.lora_gate[index].to(module.lora_A.weight.dtype)  # (k,)
            tensors[f"{prefix}.lora_A.weight"] = (module.lora_A.weight[index] * gate[:, None]).contiguous()  # (k, in)
            lora_b = module.lora_B.weight[:, index] * module.scaling  # (out, k)
            tensors[f"{prefix}.lora_B.weight"] = lora_b.contiguous()
            ranks[module.name] = int(index.numel())
    if not ranks:
        raise RuntimeFailure("every adapted module was pruned to rank 0; there is no adapter to write")
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    config = {k: v for k, v in model.peft_config["default"].to_dict().items() if k in lora_fields or k == "peft_type"}
    top = max(ranks.values())
    config.update(
        r=top,
        lora_alpha=top,
        rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks),
        target_modules=sorted(ranks),
        exclude_modules=None,
        use_rslora=False,
        layers_to_transform=None,
        layers_pattern=None,
    )
    return tensors, config


def _save_gated(model: PeftModel, modules: list[GatedModule], folder: Path) -> None:
    tensors, config = gated_adapter(model, modules)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=_jsonable) + "\n", encoding="utf-8")


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else str(value)


def write_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output_dir: str | Path,
    gated: list[GatedModule] | None = None,
    sidecars: Callable[[Path], dict[str, Any]] | None = None,
) -> None:
    """Saves adapter_config.json + adapter_model.safetensors (+ tokenizer) into output_dir, config last.

    Args:
        model: the trained PeftModel.
        tokenizer: saved beside the adapter (when given).
        output_dir: the run's output folder.
        gated: the gated modules of an adaptive-rank run, exported in canonical vanilla form.
        sidecars: given the staged adapter folder, returns {file name: JSON payload} to write beside it (for
            example ranktune.json), so they are in place before the adapter looks finished.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / ADAPTER_CONFIG).unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=output_dir))
    try:
        if gated:
            _save_gated(model, gated, staging)
        else:
            model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, payload in (sidecars(staging) if sidecars else {}).items():
            (staging / name).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        files = sorted(staging.iterdir(), key=lambda p: p.name == ADAPTER_CONFIG)
        for path in files:
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
