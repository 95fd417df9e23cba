"""LoRA adapters: building them on a base model, loading saved ones, and reading their per-module ranks."""

from ranktune.adapters.layout import ModuleRank, read_module_ranks
from ranktune.adapters.loading import LoadedAdapter, load_adapter
from ranktune.adapters.lora import attach_lora, build_lora_config

__all__ = [
    "LoadedAdapter",
    "ModuleRank",
    "attach_lora",
    "build_lora_config",
    "load_adapter",
    "read_module_ranks",
]
