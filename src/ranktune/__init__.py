"""ranktune: LoRA fine-tuning that learns where rank belongs, with adapters in vanilla PEFT format.

The Python API mirrors the command line: `load_config` reads a run config, `train` runs it, `load_adapter` loads
a trained adapter (shortcut connections included) onto its base model, `export_adapter` writes an adapter in a
serving form (peft, uniform, gguf).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ranktune.adapters.loading import load_adapter
    from ranktune.allocation.l1ra import L1RAConfig
    from ranktune.config import RunConfig, load_config
    from ranktune.serving.export import export_adapter
    from ranktune.trainers import L1RASFTTrainer, L1RATrainer
    from ranktune.training import TrainResult, train

_LAZY = {
    "L1RAConfig": "ranktune.allocation.l1ra",
    "L1RATrainer": "ranktune.trainers",
    "L1RASFTTrainer": "ranktune.trainers",
    "RunConfig": "ranktune.config",
    "load_config": "ranktune.config",
    "load_adapter": "ranktune.adapters.loading",
    "export_adapter": "ranktune.serving.export",
    "TrainResult": "ranktune.training",
    "train": "ranktune.training",
}

__all__ = [
    "L1RAConfig",
    "L1RASFTTrainer",
    "L1RATrainer",
    "RunConfig",
    "TrainResult",
    "__version__",
    "export_adapter",
    "load_adapter",
    "load_config",
    "train",
]


def __getattr__(name: str):
    """Imports heavy modules (torch, transformers) only when their names are used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ranktune' has no attribute {name!r}")
