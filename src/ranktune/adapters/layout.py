"""Per-module ranks and sizes of a saved adapter, read from its tensors alone (no base model needed)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors import safe_open

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


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


def read_module_ranks(adapter_dir: str | Path) -> list[ModuleRank]:
    """Reads lora_A ([r, in]) and lora_B ([out, r]) shapes from adapter_model.safetensors, in module order."""
    shapes: dict[str, dict[str, list[int]]] = {}
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
            match = _LORA_KEY.match(key)
            if match:
                shapes.setdefault(match["module"], {})[match["part"]] = tensors.get_slice(key).get_shape()
    ranks = []
    for module, parts in shapes.items():
        layer = _LAYER_INDEX.search(module)
        rank, in_features = parts["A"]
        ranks.append(
            ModuleRank(
                module=module,
                layer=int(layer.group(1)) if layer else None,
                module_type=module.rsplit(".", 1)[-1],
                rank=rank,
                in_features=in_features,
                out_features=parts["B"][0],
            )
        )
    return sorted(ranks, key=lambda m: (m.layer if m.layer is not None else -1, m.module))
