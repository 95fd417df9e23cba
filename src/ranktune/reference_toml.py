"""HeteroLoRA's TOML config of LoRA modules or shortcut connections (`reference_config`), read into our settings.

Imports no torch: `lora.reference_config` and `shortcuts.reference_config` are read when the config is validated
(once: `files.read_once`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from ranktune.adapters.shortcut_types import SHORTCUT_KINDS
from ranktune.config import ModuleSettings
from ranktune.errors import UserInputError, did_you_mean
from ranktune.files import read_once

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from ranktune.config import LoraSettings, ShortcutSettings

ReferenceKind = Literal["lora", "shortcuts"]

# The reference's field names → ours ("disabled" becomes ModuleSettings.enabled, negated).
_REFERENCE_FIELDS: dict[str, dict[str, str]] = {
    "lora": {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "disable_adapter": "disabled"},
    "shortcuts": {"r": "r", "shortcut_alpha": "alpha", "proj_dropout": "dropout", "disable_projector": "disabled"},
}
_REFERENCE_IGNORED = {"lora": {"adapter_name", "importance_beta"}, "shortcuts": {"projector_name", "importance_beta"}}
_LAYER_TABLE = re.compile(r"model_layer_(\d+)")
# Keys of a config section that a reference config replaces: setting both is ambiguous.
_REPLACED_BY_REFERENCE = {
    "lora": ("r", "alpha", "dropout", "target_modules", "modules", "layers"),
    "shortcuts": ("kinds", "r", "alpha", "dropout", "modules", "layers"),
}


def read_reference_toml(path: str | Path, kind: ReferenceKind) -> dict[str, Any]:
    """Reads HeteroLoRA's TOML config of LoRA modules or shortcut connections into our field names.

    The reference writes `granularity = "network" | "layer"`, a `[default]` table, then `[all_layers.<module>]` or
    `[model_layer_<i>.<module>]` tables whose missing fields fall back to `[default]`. Each module table becomes a
    complete `ModuleSettings` (r = 0 or disable_adapter / disable_projector = true turn it off), so that the result
    can update a `LoraSettings` / `ShortcutSettings` section.

    Args:
        path: The TOML file.
        kind: "lora" (fields r, lora_alpha, lora_dropout, disable_adapter) or "shortcuts" (r, shortcut_alpha,
            proj_dropout, disable_projector; module keys residual1, residual2, shortcut1, shortcut2).

    Returns:
        `r`, `alpha`, `dropout` (those that `[default]` sets; r only when above 0), `default_enabled` (whether the
        modules that no table lists are on), `modules` ({module: ModuleSettings}, network granularity) and `layers`
        ({layer index: {module: ModuleSettings}}, layer granularity; the other of the two is empty).

    Raises:
        UserInputError: the file is missing or not TOML, the granularity is unknown, `[default]` is missing, or a
            table is in the wrong place or has an unknown field or a value of the wrong type or range.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserInputError(f"cannot read reference config {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise UserInputError(f"reference config {path} is not valid TOML: {error}") from None
    granularity = data.pop("granularity", None)
    if granularity not in ("network", "layer"):
        raise UserInputError(f'reference config {path}: granularity must be "network" or "layer", got {granularity!r}')
    module_tables = "[all_layers.<module>]" if granularity == "network" else "[model_layer_<i>.<module>]"
    if not isinstance(data.get("default"), dict):
        raise UserInputError(f"reference config {path}: a [default] table is required, then {module_tables} tables")
    default = _read_fields(path, kind, "default", data.pop("default"))
    result: dict[str, Any] = {key: float(value) for key, value in default.items() if key in ("alpha", "dropout")}
    if default.get("r"):
        result["r"] = default["r"]
    result.update(default_enabled=_module_settings(path, kind, "default", default).enabled, modules={}, layers={})
    for table_name, table in data.items():
        match = _LAYER_TABLE.fullmatch(table_name)
        if granularity == "network" and table_name == "all_layers":
            result["modules"] = _read_modules(path, kind, table_name, table, default)
        elif granularity == "layer" and match:
            result["layers"][int(match.group(1))] = _read_modules(path, kind, table_name, table, default)
        else:
            raise UserInputError(
                f"reference config {path}: unexpected key or table [{table_name}] with granularity = "
                f'"{granularity}"; expected granularity, [default] and {module_tables} tables'
            )
    return result


def _read_modules(
    path: Path, kind: ReferenceKind, table_name: str, table: Any, default: dict[str, Any]
) -> dict[str, ModuleSettings]:
    """The module tables under `[all_layers]` or `[model_layer_<i>]`, each completed from `[default]`."""
    if not isinstance(table, dict):
        raise UserInputError(f"reference config {path}: [{table_name}] must hold [{table_name}.<module>] tables")
    modules = {}
    for name, fields in table.items():
        where = f"{table_name}.{name}"
        if kind == "shortcuts" and name not in SHORTCUT_KINDS:
            raise UserInputError(
                f"reference config {path}: unknown shortcut kind in [{where}]; expected one of "
                f"{', '.join(SHORTCUT_KINDS)}.{did_you_mean(name, SHORTCUT_KINDS)}"
            )
        if not isinstance(fields, dict):
            raise UserInputError(f"reference config {path}: [{where}] must be a table of {_expected_fields(kind)}")
        modules[name] = _module_settings(path, kind, where, {**default, **_read_fields(path, kind, where, fields)})
    return modules


def _expected_fields(kind: ReferenceKind) -> str:
    return ", ".join(_REFERENCE_FIELDS[kind])


def _read_fields(path: Path, kind: ReferenceKind, where: str, fields: dict[str, Any]) -> dict[str, Any]:
    """One table's fields under our names, type-checked; the reference's bookkeeping fields are dropped."""
    names = _REFERENCE_FIELDS[kind]
    values = {}
    for key, value in fields.items():
        if key in _REFERENCE_IGNORED[kind]:
            continue
        if key not in names:
            raise UserInputError(
                f"reference config {path}: unknown field '{key}' in [{where}]; expected "
                f"{_expected_fields(kind)}.{did_you_mean(key, names)}"
            )
        ours = names[key]
        if ours == "disabled":
            valid = isinstance(value, bool)
        elif ours == "r":
            valid = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not valid:
            expected = {"disabled": "true or false", "r": "a whole number >= 0"}.get(ours, "a number")
            raise UserInputError(f"reference config {path}: [{where}] {key} must be {expected}, got {value!r}")
        values[ours] = value
    return values


def _module_settings(path: Path, kind: ReferenceKind, where: str, values: dict[str, Any]) -> ModuleSettings:
    """A complete table as ModuleSettings; r = 0 means off, like disable_adapter / disable_projector."""
    enabled = not values.get("disabled", False) and values.get("r") != 0
    try:
        return ModuleSettings(
            r=values.get("r") or None, alpha=values.get("alpha"), dropout=values.get("dropout"), enabled=enabled
        )
    except ValidationError as error:
        first = error.errors()[0]
        ours = str(first["loc"][0])
        theirs = next(key for key, name in _REFERENCE_FIELDS[kind].items() if name == ours)
        message = first["msg"].removeprefix("Value error, ")
        raise UserInputError(
            f"reference config {path}: [{where}] {theirs}: {message} (got {first['input']!r})"
        ) from None


def read_reference(settings: LoraSettings | ShortcutSettings, kind: ReferenceKind) -> dict[str, Any]:
    """The reference config of a `lora` or `shortcuts` section, which must set nothing the reference replaces.

    Raises:
        UserInputError: the section also sets a key the reference replaces, or the file is invalid.
    """
    section = "lora" if kind == "lora" else "shortcuts"
    both = [key for key in _REPLACED_BY_REFERENCE[kind] if key in settings.model_fields_set]
    if both:
        raise UserInputError(
            f"{section}.reference_config and {section}.{both[0]} both set the modules' settings; use one or the "
            f"other ({section}.reference_config replaces {', '.join(_REPLACED_BY_REFERENCE[kind])})"
        )
    return read_once(str(settings.reference_config), read_reference_toml, kind)
