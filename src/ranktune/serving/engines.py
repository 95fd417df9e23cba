"""What each inference engine reads of a PEFT adapter, what it refuses, and the rank it serves at.

From each engine's loader (versions named in the README's compatibility table), and measured where it ran:
- vLLM pads every module to `--max-lora-rank`, which must be one of VLLM_RANKS; it applies PEFT's per-module
  patterns correctly, refuses modules_to_save and DoRA.
- SGLang refuses an adapter whose rank_pattern / alpha_pattern differ from the global r / lora_alpha.
- TGI and LoRAX read only r, lora_alpha and use_rslora, and stack every layer's factors for a module type: ranks
  must be equal, and a module type missing from some layer is dropped from all of them.
- llama.cpp's converter writes the global lora_alpha only and llama.cpp scales each module by alpha / its own rank:
  a heterogeneous canonical adapter converted that way is applied at the wrong scale, with no error.
"""

from __future__ import annotations

from collections import defaultdict

from ranktune.adapters.layout import layer_of

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(largest_rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that holds the largest rank (None: above vLLM's largest)."""
    return next((rank for rank in VLLM_RANKS if rank >= largest_rank), None)


def missing_module_types(names: list[str]) -> dict[str, list[int]]:
    """{module type: layers lacking it} for the types present in some layers and absent from others."""
    layers_by_type: dict[str, set[int]] = defaultdict(set)
    all_layers: set[int] = set()
    for name in names:
        layer = layer_of(name)
        if layer is None:
            continue
        kind = name.split(f".{layer}.", 1)[1]
        layers_by_type[kind].add(layer)
        all_layers.add(layer)
    return {kind: sorted(all_layers - layers) for kind, layers in layers_by_type.items() if layers != all_layers}


def engine_warnings(form: str, ranks: dict[str, int], has_other_tensors: bool) -> list[str]:
    """One line per engine that will refuse or misread this form of the adapter (`form`: peft, uniform or gguf)."""
    warnings = []
    heterogeneous = len(set(ranks.values())) > 1
    if has_other_tensors and form != "gguf":
        warnings.append(
            "vLLM refuses adapters with modules_to_save tensors (a classifier head, trained embeddings); "
            "PEFT and TGI load them"
        )
    if form == "peft" and heterogeneous:
        warnings.append(
            "SGLang refuses, and TGI / LoRAX / llama.cpp's converter misread, per-module ranks: export "
            "--format uniform (or gguf for llama.cpp) for them; vLLM and PEFT read this form correctly"
        )
    missing = missing_module_types(list(ranks))
    if missing and form != "gguf":
        kinds = ", ".join(f"{kind} (absent from layers {', '.join(map(str, layers))})" for kind, layers in
                          sorted(missing.items()))  # fmt: skip
        warnings.append(f"TGI and LoRAX drop a module type from every layer when one layer lacks it: {kinds}")
    largest = max(ranks.values())
    if vllm_max_lora_rank(largest) is None:
        warnings.append(f"vLLM serves ranks up to {VLLM_RANKS[-1]}; the largest rank here is {largest}")
    return warnings
