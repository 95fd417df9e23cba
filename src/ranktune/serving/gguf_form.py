"""A llama.cpp LoRA adapter (GGUF) written from folded factors, with every module's scale exactly right.

llama.cpp scales each module's update by `adapter_scale · alpha / rank`, with alpha the file's one
`adapter.lora.alpha` and rank the module's own tensor rank, or by `adapter_scale` alone when alpha is 0
(`llama_adapter_lora_weight::get_scale`). Its converter writes PEFT's global lora_alpha, so a module whose rank
differs from r is scaled wrongly (a rank-2 module of an r = 16 adapter 8x too much). Here the scale is folded into B
and alpha is written as 0, so every module is applied at scale 1 whatever its rank.

Tensor names, shapes and the metadata follow llama.cpp's `convert_lora_to_gguf.py`: `<gguf tensor>.lora_a` holding
A (k, in) and `.lora_b` holding B (out, k) in float32, `general.type = adapter`, `adapter.type = lora`. For llama
architectures the converter permutes the rows of q_proj and k_proj (its rotary layout), which for a LoRA update
permutes the rows of B; the same permutation is applied here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ranktune.errors import UserInputError

# The base architectures whose GGUF layout this writer knows (checked against llama.cpp with a real model), and the
# llama.cpp architecture each maps to.
ARCHITECTURES = {"LlamaForCausalLM": "llama"}
_ROTARY_PERMUTED = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}


def llama_permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's reordering of a q / k projection's output rows (HF's rotary halves to interleaved pairs), applied
    to the rows of a (out, k) matrix."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_tensors(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]], base_config: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """{GGUF tensor name: float32 tensor} for the factors (A (k, in), B (out, k) with the scale folded in).

    Raises:
        UserInputError: a base architecture this writer does not know, or a module llama.cpp has no tensor for.
    """
    import gguf

    architecture = (base_config.get("architectures") or ["?"])[0]
    if architecture not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UserInputError(
            f"the GGUF form knows the {known} layout, and the base model is {architecture}; export the uniform "
            "form and convert it with llama.cpp's convert_lora_to_gguf.py (every module then has the same rank, "
            "so its single alpha is right)"
        )
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == ARCHITECTURES[architecture])
    names = gguf.get_tensor_name_map(arch, int(base_config["num_hidden_layers"]))
    heads = {key: int(base_config.get(field) or base_config["num_attention_heads"]) for key, field in
             _ROTARY_PERMUTED.items()}  # fmt: skip
    tensors = {}
    for name, (lora_a, lora_b) in modules.items():
        target = names.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if target is None or (name.endswith("lm_head") and base_config.get("tie_word_embeddings")):
            raise UserInputError(f"llama.cpp has no separate tensor for module '{name}' of a {architecture}")
        kind = name.rsplit(".", 1)[-1]
        if kind in heads:
            lora_b = llama_permute(lora_b, heads[kind])
        tensors[f"{target}.lora_a"] = lora_a.float().contiguous()  # (k, in)
        tensors[f"{target}.lora_b"] = lora_b.float().contiguous()  # (out, k)
    return tensors


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], base_config: dict[str, Any]) -> None:
    """Writes the adapter file: the tensors, and metadata as llama.cpp's converter writes it with alpha 0."""
    import gguf

    writer = gguf.GGUFWriter(str(path), ARCHITECTURES[base_config["architectures"][0]])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: llama.cpp applies each module at scale 1
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
