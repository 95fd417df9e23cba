"""What an adapter folder holds, read from its files alone (no base model, no torch model code needed).

Cheap to import, so the command line can refuse a folder that is not an adapter before loading any library.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ranktune.errors import UserInputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"  # PEFT's old format: unpickling it can run code, so it is never read
RUN_INFO = "ranktune.json"
RANK_HISTORY = "rank_history.jsonl"
REALLOCATION_HISTORY = "reallocation_history.jsonl"
SHORTCUTS_CONFIG = "shortcuts.json"  # beside the PEFT adapter: what PEFT cannot express
SHORTCUTS_WEIGHTS = "shortcuts.safetensors"
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The layer index in a module name (`model.layers.3.self_attn.q_proj` → 3); None outside the layers."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def module_types(names: Iterable[str]) -> dict[str, str]:
    """A short, distinct type label per module name: the path after the layer index, cut to its shortest suffix
    that no other type ends with (llama: q_proj, down_proj; BERT: query, attention.output.dense, output.dense).

    Modules outside the layers (a pooler) keep their whole path as the type before shortening.
    """
    full = {}
    for name in names:
        layer = _LAYER_INDEX.search(name)
        full[name] = name[layer.end() :] if layer else name
    types = set(full.values())

    def shortest(kind: str) -> str:
        parts = kind.split(".")
        for k in range(1, len(parts)):
            suffix = parts[-k:]
            if all(other.split(".")[-k:] != suffix for other in types - {kind}):
                return ".".join(suffix)
        return kind

    labels = {kind: shortest(kind) for kind in types}
    return {name: labels[kind] for name, kind in full.items()}


@dataclass(frozen=True)
class ModuleRank:
    """One adapted module: where it sits, its rank and its trainable parameter count."""

    module: str
    layer: int | None
    module_type: str
    rank: int
    in_features: int
    out_features: int

    @property
    def parameters(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def to_dict(self) -> dict:
        return {**asdict(self), "parameters": self.parameters}


def module_totals(modules: list[ModuleRank]) -> dict[str, int]:
    """Module count, total rank and LoRA parameter count of an adapter."""
    return {
        "module_count": len(modules),
        "total_rank": sum(m.rank for m in modules),
        "adapter_parameters": sum(m.parameters for m in modules),
    }


def read_module_ranks(adapter_dir: str | Path) -> list[ModuleRank]:
    """Reads lora_A ([r, in]) and lora_B ([out, r]) shapes from adapter_model.safetensors, in module order."""
    shapes: dict[str, dict[str, list[int]]] = {}
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
            match = _LORA_KEY.match(key)
            if match:
                shapes.setdefault(match["module"], {})[match["part"]] = tensors.get_slice(key).get_shape()
    ranks = []
    types = module_types(shapes)
    for module, parts in shapes.items():
        rank, in_features = parts["A"]
        ranks.append(
            ModuleRank(
                module=module,
                layer=layer_of(module),
                module_type=types[module],
                rank=rank,
                in_features=in_features,
                out_features=parts["B"][0],
            )
        )
    return sorted(ranks, key=lambda m: (m.layer if m.layer is not None else -1, m.module))


def read_shortcut_ranks(adapter_dir: str | Path) -> list[ModuleRank]:
    """The shortcut connections described in shortcuts.json (none for a plain LoRA adapter), as d×d modules.

    Raises:
        UserInputError: shortcuts.json exists but cannot be read.
    """
    path = Path(adapter_dir) / SHORTCUTS_CONFIG
    if not path.is_file():
        return []
    try:
        described = json.loads(path.read_text(encoding="utf-8"))
        connections, width = described["connections"], int(described["hidden_size"])
        return [
            ModuleRank(name, int(entry["layer"]), str(entry["kind"]), int(entry["r"]), width, width)
            for name, entry in connections.items()
        ]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise UserInputError(f"cannot read {path}: {error}") from None


def check_weights_file(path: Path) -> None:
    """Reads a safetensors file's header, which safetensors checks against the file's size.

    Raises:
        UserInputError: the file is truncated, damaged or not a safetensors file.
    """
    try:
        with safe_open(str(path), framework="pt") as tensors:
            tensors.keys()
    except (OSError, SafetensorError) as error:
        raise UserInputError(
            f"{path} is damaged or not a safetensors file ({error}); copy the adapter again or save it anew"
        ) from None


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """Reads adapter_config.json, refusing folders that are not LoRA adapters or whose weights file is damaged.

    Only adapter_model.safetensors is read: a folder with PEFT's pickled adapter_model.bin alone is refused, as
    unpickling a file someone handed you can run any code.

    Raises:
        UserInputError: not an adapter folder, a pickled or damaged weights file, or not a LoRA adapter.
    """
    config_path = adapter_dir / ADAPTER_CONFIG
    weights = adapter_dir / ADAPTER_WEIGHTS
    if config_path.is_file() and not weights.exists() and (adapter_dir / PICKLED_WEIGHTS).is_file():
        raise UserInputError(
            f"'{adapter_dir}' holds {PICKLED_WEIGHTS}, a pickle (loading one can run code), and no {ADAPTER_WEIGHTS}; "
            f"ranktune reads {ADAPTER_WEIGHTS} only: convert the adapter where you trust its file "
            "(PeftModel.from_pretrained(...).save_pretrained(folder) writes safetensors)"
        )
    if not adapter_dir.is_dir() or not config_path.is_file() or not weights.is_file():
        raise UserInputError(
            f"'{adapter_dir}' is not an adapter directory: expected adapter_config.json and {ADAPTER_WEIGHTS} "
            "(the output_dir of `ranktune train`, or a PEFT LoRA adapter folder)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"cannot read {config_path}: {error}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise UserInputError(f"{config_path}: peft_type is {peft_type!r}; ranktune loads LORA adapters")
    check_weights_file(weights)
    return config


def read_run_info(adapter_dir: Path) -> dict[str, Any]:
    """ranktune.json of a ranktune run, or {} for an adapter made elsewhere.

    Raises:
        UserInputError: ranktune.json exists but is not a readable JSON object.
    """
    path = adapter_dir / RUN_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"cannot read {path}: {error}") from None
    if not isinstance(info, dict):
        raise UserInputError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info
