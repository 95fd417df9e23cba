"""An adapter folder read as per-module factors (A, B) whose product is the module's whole update ΔW = B · A.

PEFT applies each module's scale (alpha_m / r_m, or alpha_m / √r_m with rsLoRA) at run time, choosing r_m and
alpha_m by its first-match rule over `rank_pattern` / `alpha_pattern`. Here the scale is folded into B once (in
float32), so every form written from these factors applies the same update whatever scale rule its reader follows:
exactly for a float32 adapter, to the dtype's rounding of B · scale for a bf16 or fp16 one (written back in it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file

from ranktune.adapters.layout import ADAPTER_WEIGHTS, read_adapter_config
from ranktune.errors import UserInputError

_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")


@dataclass
class AdapterFactors:
    """A LoRA adapter as folded factors.

    Attributes:
        folder: where it was read from.
        config: its adapter_config.json.
        modules: {module name: (A (k, in), B (out, k) with the module's scale folded in)}, in file order.
        other: the tensors that are not LoRA factors (modules_to_save, such as a classifier head), keyed as saved.
        dtype: the factors' dtype in the file (they are held in float32 here and written back in it).
    """

    folder: Path
    config: dict[str, Any]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    other: dict[str, torch.Tensor]
    dtype: torch.dtype = torch.float32

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(a.shape[0]) for name, (a, _) in self.modules.items()}

    @property
    def largest_rank(self) -> int:
        return max(self.ranks.values())


def module_scale(config: dict[str, Any], name: str) -> tuple[int, float]:
    """(r_m, scale_m) PEFT gives module `name` under this adapter_config: the first key of rank_pattern /
    alpha_pattern that matches the name as a suffix at a dot boundary, else the global r / lora_alpha."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank = int(rank_pattern.get(get_pattern_key(list(rank_pattern), name), config.get("r", 8)))
    alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), name), config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, scale


def read_factors(adapter_dir: str | Path) -> AdapterFactors:
    """Reads a LoRA adapter folder (safetensors only) into folded factors.

    Raises:
        UserInputError: not a LoRA adapter folder, a DoRA or embedding adapter (not plain low-rank factors), a
            module with only one of its factors, or a module whose tensors' rank is not the rank the config gives
            it (PEFT would refuse to load it).
    """
    folder = Path(adapter_dir)
    config = read_adapter_config(folder)
    where = folder / "adapter_config.json"
    if config.get("use_dora"):
        raise UserInputError(
            f"{where}: a DoRA adapter is not plain low-rank factors (its magnitude vector rescales each weight "
            "column); serve it merged into the base model (`ranktune merge`)"
        )
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        elif ".lora_" in key:
            raise UserInputError(
                f"{folder / ADAPTER_WEIGHTS}: '{key}' is not a LoRA factor of a linear layer (embedding LoRA and "
                "other PEFT extras are not supported by the serving forms)"
            )
        else:
            other[key] = tensor
    if not parts:
        raise UserInputError(f"{folder / ADAPTER_WEIGHTS}: no lora_A / lora_B tensors")
    modules = {}
    for name, pair in parts.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise UserInputError(f"{folder / ADAPTER_WEIGHTS}: module '{name}' has no {missing}.weight")
    dtype = next(iter(parts.values()))["A"].dtype
    for name, pair in parts.items():
        lora_a, lora_b = pair["A"].float(), pair["B"].float()  # (k, in), (out, k)
        rank, scale = module_scale(config, name)
        if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise UserInputError(
                f"{where}: module '{name}' has rank {rank} by the config but its tensors have rank "
                f"{lora_a.shape[0]} (lora_A) and {lora_b.shape[1]} (lora_B); PEFT would not load this adapter either"
            )
        modules[name] = (lora_a.contiguous(), (lora_b * scale).contiguous())
    return AdapterFactors(folder, config, modules, other, dtype)
