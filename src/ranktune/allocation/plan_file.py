"""A `ranktune plan` file (`lora.plan`), read once when the config is validated, and what it does to a run.

The plan says, per candidate (LoRA module or shortcut connection), whether it is enabled and at which rank. It
replaces the `lora` section's targets and ranks, and selects and sizes the `shortcuts` section's connections.
Imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ranktune.adapters.layout import layer_of
from ranktune.adapters.shortcut_types import ShortcutSpec, is_shortcut
from ranktune.config import UniqueKeyLoader
from ranktune.errors import UserInputError
from ranktune.files import read_once

if TYPE_CHECKING:
    from ranktune.config import LoraSettings

PLAN_FORMAT = "ranktune-plan-1"

ShortcutSpecs = dict[tuple[int, str], ShortcutSpec]
"""{(layer index, kind): the connection's settings}."""


@dataclass(frozen=True)
class Plan:
    """A validated plan: {candidate: {"enabled": bool, "rank": int, ...}} in the file's order."""

    path: str
    modules: dict[str, dict[str, Any]]

    @property
    def lora_ranks(self) -> dict[str, int]:
        """The enabled LoRA modules and their ranks."""
        return {
            name: entry["rank"] for name, entry in self.modules.items() if entry["enabled"] and not is_shortcut(name)
        }

    @property
    def has_shortcuts(self) -> bool:
        """Whether the plan was made from scores that include shortcut connections."""
        return any(is_shortcut(name) for name in self.modules)

    def apply_to_lora(self, settings: LoraSettings) -> LoraSettings:
        """The `lora` section with the plan applied: the enabled modules as exact targets at their planned ranks.

        Every module keeps the pool's scale (alpha / r; alpha / sqrt(r) with rslora) through alpha_pattern, so a
        redistributed rank changes how many components a module has, not how strongly each counts.
        """
        enabled = self.lora_ranks

        def growth(rank: int) -> float:  # PEFT's scaling is alpha / rank, or alpha / sqrt(rank) with rslora
            return math.sqrt(rank / settings.r) if settings.rslora else rank / settings.r

        return settings.model_copy(
            update={
                "target_modules": sorted(enabled),
                "exclude_modules": None,
                "rank_pattern": enabled,
                "alpha_pattern": {name: settings.alpha * growth(rank) for name, rank in enabled.items()},
            }
        )

    def apply_to_shortcuts(self, specs: ShortcutSpecs) -> ShortcutSpecs:
        """The shortcut connections the plan enables, at their planned ranks with the pool's scale (alpha / r) kept.

        A plan without shortcut entries (scored without shortcuts) leaves the configured connections as they are.

        Raises:
            UserInputError: the plan names a connection the `shortcuts` section does not configure.
        """
        entries = {name: entry for name, entry in self.modules.items() if is_shortcut(name)}
        if not entries:
            return specs
        planned = {}
        for name, entry in entries.items():
            key = (layer_of(name), name.rsplit(".", 1)[-1])
            if key not in specs:
                raise UserInputError(
                    f"lora.plan: '{self.path}' enables shortcut '{name}', which the shortcuts section does not "
                    "configure"
                )
            if entry["enabled"]:
                spec = specs[key]
                rank = entry["rank"]
                planned[key] = ShortcutSpec(rank, spec.alpha * rank / spec.r, spec.dropout)
        return {key: planned[key] for key in specs if key in planned}


def read_plan(path: str | Path) -> Plan:
    """Reads and checks a `ranktune plan` output, once per version of the file (`files.read_once`).

    Raises:
        UserInputError: missing, malformed, not a plan, or a plan that enables no LoRA module.
    """
    return read_once(str(path), _parse_plan)


def _parse_plan(path: str) -> Plan:
    data = read_yaml_mapping(path, "lora.plan")
    modules = data.get("modules")
    if data.get("format") != PLAN_FORMAT or not isinstance(modules, dict):
        raise UserInputError(f"lora.plan: '{path}' is not a `ranktune plan` output (expected format: {PLAN_FORMAT})")
    for name, entry in modules.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("enabled"), bool):
            raise UserInputError(f"lora.plan: module '{name}' in '{path}' needs enabled: true|false")
        if entry["enabled"] and (not isinstance(entry.get("rank"), int) or entry["rank"] <= 0):
            raise UserInputError(f"lora.plan: enabled module '{name}' in '{path}' needs a rank > 0")
    if not any(entry["enabled"] for entry in modules.values()):
        raise UserInputError(f"lora.plan: '{path}' enables no module")
    plan = Plan(str(path), modules)
    if not plan.lora_ranks:
        raise UserInputError(f"lora.plan: '{path}' enables no LoRA module")
    return plan


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (duplicate keys refused).

    Raises:
        UserInputError: naming `what` the file is for.
    """
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except FileNotFoundError:
        raise UserInputError(f"{what}: '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserInputError(f"{what}: cannot read '{path}': {error}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{what}: '{path}' must hold a mapping")
    return data
