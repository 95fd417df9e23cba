"""The PEFT forms of an adapter: canonical (each module at its own rank) and uniform (every module at one rank).

Both carry the scale folded into B, so PEFT's scale is exactly 1 for every module:
- canonical: `r = lora_alpha = largest rank`, `rank_pattern = alpha_pattern = {module: its rank}`, the exact list
  of modules as `target_modules` (what `ranktune train` writes for an adaptive-rank run);
- uniform: every module zero-padded to one rank R, `r = lora_alpha = R`, no patterns. The padding rows and columns
  are zeros, so the update is the same to float32 rounding, and it loads in readers that take only the global r and
  lora_alpha (SGLang, TGI, LoRAX, llama.cpp's converter, PEFT's hotswap and every add_weighted_adapter mode).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from peft import LoraConfig


def _lora_fields(base: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(LoraConfig)}
    return {key: value for key, value in base.items() if key in names}


def canonical_config(base: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """adapter_config.json of the canonical form: `base`'s other settings (task type, base model, modules_to_save,
    ...) with the ranks and scales of `ranks` ({module name: rank}, scale folded into B)."""
    top = max(ranks.values())
    return {
        **_lora_fields(base),
        "peft_type": "LORA",
        "r": top,
        "lora_alpha": top,
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,  # as PEFT's save_pretrained writes it
    }


def uniform_config(base: dict[str, Any], names: list[str], rank: int) -> dict[str, Any]:
    """adapter_config.json of the uniform form: every module in `names` at `rank`, scale 1, no patterns."""
    config = canonical_config(base, dict.fromkeys(names, rank))
    config.update(rank_pattern={}, alpha_pattern={})
    return config


def padded(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every module's A (k, in) and B (out, k) zero-padded to `rank` rows and columns."""
    result = {}
    for name, (lora_a, lora_b) in modules.items():
        extra = rank - lora_a.shape[0]
        if extra < 0:
            raise ValueError(f"module '{name}' has rank {lora_a.shape[0]}, above the padding rank {rank}")
        wide_a = torch.cat([lora_a, lora_a.new_zeros(extra, lora_a.shape[1])])  # (rank, in)
        wide_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], extra)], dim=1)  # (out, rank)
        result[name] = (wide_a, wide_b)
    return result


def peft_tensors(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]], other: dict[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The safetensors payload: the factors under PEFT's keys, in `dtype`, and the other tensors as they were."""
    tensors = dict(other)
    for name, (lora_a, lora_b) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    return tensors
