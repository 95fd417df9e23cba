"""Shortcut connections on disk: shortcuts.safetensors plus shortcuts.json, beside the vanilla PEFT adapter.

PEFT has no notion of a low-rank map on the residual stream or across layers, so the LoRA part of a HeteroLoRA
adapter stays a plain PEFT LoRA adapter (any PEFT tool loads it, without the shortcuts) and the connections sit
beside it:

- shortcuts.safetensors: `<connection>.A` (r, d) and `<connection>.B` (d, r) per connection, named as in the base
  model (`model.layers.3.residual1.A`);
- shortcuts.json: the format tag, the base model's type and layer list, the hidden size, and per connection its
  layer, kind, r, alpha (scale alpha / r) and dropout.

A connection that is not in the files contributes only its base (identity for residual1/2, zero for shortcut1/2),
so an exported adapter leaves disabled connections out. Checkpoints keep all of them, disabled ones included, so
that a resumed run continues with their trained values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ranktune.adapters.layout import SHORTCUTS_CONFIG, SHORTCUTS_WEIGHTS
from ranktune.adapters.shortcut_types import SHORTCUT_KINDS, ShortcutSpec
from ranktune.adapters.shortcuts import ShortcutSet, bare_model, install_shortcuts
from ranktune.errors import UserInputError
from ranktune.files import write_text_atomically

FORMAT = "ranktune-shortcuts-1"


def shortcut_files(shortcuts: ShortcutSet, only_enabled: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON description of the connections (only the enabled ones by default)."""
    tensors: dict[str, torch.Tensor] = {}
    described: dict[str, Any] = {}
    for name, connection in shortcuts.named_connections():
        if only_enabled and not connection.enabled:
            continue
        spec = connection.spec
        tensors[f"{name}.A"] = connection.A.detach().cpu().contiguous()
        tensors[f"{name}.B"] = connection.B.detach().cpu().contiguous()
        layer, kind = name.rsplit(".", 2)[1:]
        described[name] = {"layer": int(layer), "kind": kind, "r": spec.r, "alpha": spec.alpha, "dropout": spec.dropout}
    config = {
        "format": FORMAT,
        "model_type": shortcuts.model_type,
        "layers": shortcuts.layers_path,
        "hidden_size": shortcuts.width,
        "connections": described,
    }
    return tensors, config


def write_shortcuts(shortcuts: ShortcutSet, folder: Path, only_enabled: bool = True) -> None:
    """Writes shortcuts.safetensors, then shortcuts.json, into `folder`, each through a temporary file moved into
    place, so a crash never leaves a half-written file (a checkpoint without them is refused on resume)."""
    tensors, config = shortcut_files(shortcuts, only_enabled)
    partial = folder / f".{SHORTCUTS_WEIGHTS}.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, folder / SHORTCUTS_WEIGHTS)
    write_text_atomically(folder / SHORTCUTS_CONFIG, json.dumps(config, indent=2) + "\n")


def read_shortcut_config(folder: Path) -> dict[str, Any] | None:
    """shortcuts.json of an adapter folder, checked; None when the adapter has no shortcut connections.

    Raises:
        UserInputError: the file is unreadable, of another format, or describes a connection wrongly.
    """
    path = folder / SHORTCUTS_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserInputError(f"cannot read {path}: {error}") from None
    connections = config.get("connections") if isinstance(config, dict) else None
    if not isinstance(connections, dict) or config.get("format") != FORMAT:
        raise UserInputError(f"{path} is not a ranktune shortcut description (expected format: {FORMAT})")
    for name, entry in config["connections"].items():
        valid = (
            isinstance(entry, dict)
            and entry.get("kind") in SHORTCUT_KINDS
            and isinstance(entry.get("layer"), int)
            and entry["layer"] >= (1 if entry["kind"] == "shortcut2" else 0)
            and isinstance(entry.get("r"), int)
            and entry["r"] > 0
            and isinstance(entry.get("alpha"), (int, float))
            and isinstance(entry.get("dropout", 0.0), (int, float))
        )
        if not valid:
            raise UserInputError(
                f"{path}: connection '{name}' needs layer, kind ({', '.join(SHORTCUT_KINDS)}), r > 0 and alpha"
            )
    return config


def _specs(config: dict[str, Any]) -> dict[tuple[int, str], ShortcutSpec]:
    return {
        (entry["layer"], entry["kind"]): ShortcutSpec(
            entry["r"], float(entry["alpha"]), float(entry.get("dropout", 0.0))
        )
        for entry in config["connections"].values()
    }


def load_shortcut_weights(shortcuts: ShortcutSet, folder: Path) -> None:
    """Copies the saved A and B of every connection in `folder` into the installed set (same specs required).

    Raises:
        UserInputError: the file is missing, unreadable, or does not match the installed connections.
    """
    path = folder / SHORTCUTS_WEIGHTS
    if not path.is_file():
        raise UserInputError(f"{path} is missing: this folder was saved without its shortcut connections")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise UserInputError(f"cannot read {path}: {error}") from None
    installed = dict(shortcuts.named_connections())
    expected = {f"{name}.{part}" for name in installed for part in ("A", "B")}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise UserInputError(f"{path} does not match shortcuts.json: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, connection in installed.items():
            for part, parameter in (("A", connection.A), ("B", connection.B)):
                saved = tensors[f"{name}.{part}"]
                if saved.shape != parameter.shape:
                    raise UserInputError(
                        f"{path}: {name}.{part} has shape {list(saved.shape)}, expected {list(parameter.shape)}"
                    )
                parameter.copy_(saved)


def load_shortcuts(model: nn.Module, folder: str | Path) -> ShortcutSet | None:
    """Installs and loads the shortcut connections saved in an adapter folder onto `model` (after its LoRA).

    Returns:
        The installed set, or None when the folder has no shortcuts.json.

    Raises:
        UserInputError: the files are malformed or were saved for another model.
    """
    folder = Path(folder)
    config = read_shortcut_config(folder)
    if config is None:
        return None
    base = bare_model(model)
    model_type = getattr(base.config, "model_type", None)
    if config.get("model_type") != model_type or config.get("hidden_size") != base.config.hidden_size:
        raise UserInputError(
            f"{folder / SHORTCUTS_CONFIG} was saved for a {config.get('model_type')} model of hidden size "
            f"{config.get('hidden_size')}, not this {model_type} of hidden size {base.config.hidden_size}"
        )
    shortcuts = install_shortcuts(model, _specs(config))
    layer_count = len(base.get_submodule(shortcuts.layers_path))
    outside = [name for name, entry in config["connections"].items() if entry["layer"] >= layer_count]
    if config.get("layers") != shortcuts.layers_path or outside:
        raise UserInputError(
            f"{folder / SHORTCUTS_CONFIG} describes connections this model does not have (layers "
            f"'{config.get('layers')}', {outside[:3] or 'no layer out of range'}); the model has {layer_count} layers "
            f"under '{shortcuts.layers_path}'"
        )
    load_shortcut_weights(shortcuts, folder)
    return shortcuts
