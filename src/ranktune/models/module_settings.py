"""Per-module settings of LoRA modules and shortcut connections: network-wise, layer-wise, or HeteroLoRA's TOML.

A config can set r, alpha, dropout or enabled for one module in every layer (`modules`), for one module in one
layer (`layers`, applied over `modules`), or read them from the HeteroLoRA reference's TOML (`reference_config`).
PEFT's `LoraConfig` has a single dropout and pattern dictionaries whose first matching key wins, so the LoRA tables
are folded into an explicit list of full module names with one full-name pattern entry per module that differs from
the section; per-module dropouts are set on the wrapped model afterwards.
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel
from peft.utils.other import get_pattern_key
from torch import nn
from transformers import PreTrainedModel

from ranktune.adapters.shortcut_types import SHORTCUT_KINDS, ShortcutSpec
from ranktune.config import LoraSettings, ModuleSettings, ShortcutSettings
from ranktune.errors import UserInputError, did_you_mean
from ranktune.models.architectures import ABSTRACT_PROJECTIONS, Architecture, architecture_of, transformer_layers
from ranktune.models.targets import adaptable_modules, matched_modules


def _merge(current: ModuleSettings | None, update: ModuleSettings) -> ModuleSettings:
    """`update` over `current`: its set r / alpha / dropout replace, its `enabled` always decides."""
    if current is None:
        return update
    return current.model_copy(update=update.model_dump(exclude_none=True))


def _check_layer_index(index: int, count: int, where: str) -> None:
    if not 0 <= index < count:
        raise UserInputError(f"{where}: layer {index} does not exist; this model has layers 0 to {count - 1}")


def _layer_paths(model: PreTrainedModel, layers_name: str) -> list[str]:
    """The linear modules' paths inside one layer (`self_attn.q_proj`), over all layers, in model order."""
    paths: dict[str, None] = {}
    for name in adaptable_modules(model):
        if name.startswith(f"{layers_name}."):
            paths[name[len(layers_name) + 1 :].split(".", 1)[1]] = None
    return list(paths)


def _resolve_path(name: str, architecture: Architecture, paths: list[str], where: str) -> str:
    """The path inside a layer that a module name means: abstract, exact path, or a unique last component.

    Raises:
        UserInputError: the family lacks the abstract projection, or the name is unknown or ambiguous.
    """
    if name in architecture.projections:
        return architecture.projections[name]
    abstract = ", ".join(architecture.projections)
    available = f"abstract names {abstract}, or paths inside a layer (or their last component) {', '.join(paths)}"
    if name in ABSTRACT_PROJECTIONS:
        fused = ""
        if architecture.family == "gpt2" and name in ("q_proj", "k_proj", "v_proj"):
            fused = " GPT-2 fuses q, k and v into one projection, attn.c_attn; use c_attn to adapt it."
        raise UserInputError(
            f"{where}: model family '{architecture.family}' has no {name} projection.{fused} Available: {available}"
        )
    if name in paths:
        return name
    candidates = [path for path in paths if path.rsplit(".", 1)[-1] == name]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise UserInputError(f"{where}: '{name}' is ambiguous in this model; use one of {', '.join(candidates)}")
    raise UserInputError(
        f"{where}: unknown module '{name}'.{did_you_mean(name, [*architecture.projections, *paths])} "
        f"Available: {available}"
    )


def _target_selection(model: PreTrainedModel, settings: LoraSettings, layers_name: str) -> list[str]:
    """The full names that `target_modules` selects; "all-linear" means every linear module inside the layers."""
    targets = settings.target_modules
    if targets == "all-linear":
        targets = [name for name in adaptable_modules(model) if name.startswith(f"{layers_name}.")]
    config = LoraConfig(
        target_modules=targets, exclude_modules=settings.exclude_modules, modules_to_save=settings.modules_to_save
    )
    return matched_modules(model, config)


def resolve_lora_settings(model: PreTrainedModel, settings: LoraSettings) -> tuple[LoraSettings, dict[str, float]]:
    """Folds `modules`, `layers` and `reference_config` into fields that `peft.LoraConfig` understands.

    The selection starts from what `target_modules` (less `exclude_modules`) selects, or with a reference config
    from every abstract projection of the family when its `[default]` is enabled. Network-wise settings apply to the
    module in every layer, layer-wise ones over them; a listed module that is enabled is added, a disabled one
    removed. PEFT takes the first `rank_pattern` / `alpha_pattern` key that matches a module, so the user's pattern
    entries are resolved here and replaced by one full-name entry per module whose r or alpha differs from the
    section's: no key can shadow another.

    Args:
        model: The bare transformers model, before PEFT wraps it.
        settings: The `lora` section.

    Returns:
        The settings with `target_modules` as a sorted list of full module names, `exclude_modules`,
        `modules`, `layers` and `reference_config` cleared, `rank_pattern` / `alpha_pattern` keyed by full names;
        and {full module name: dropout} for the modules whose dropout differs from the section's, for
        `apply_module_dropouts`. Settings without per-module tables come back unchanged, with no dropouts.

    Raises:
        UserInputError: a module name is unknown or absent from the family, a layer index is out of range, the
            reference config is invalid or combined with explicit settings, or every module ends up disabled.
    """
    if not (settings.modules or settings.layers or settings.reference_config):
        return settings, {}
    architecture = architecture_of(model, "per-module LoRA settings (lora.modules, lora.layers, lora.reference_config)")
    layers_name, layers = transformer_layers(model, architecture)
    paths = _layer_paths(model, layers_name)
    r, alpha, dropout = settings.r, settings.alpha, settings.dropout
    if settings.reference_config:
        reference = settings.reference()
        r, alpha, dropout = reference.get("r", r), reference.get("alpha", alpha), reference.get("dropout", dropout)
        network, layer_wise = reference["modules"], reference["layers"]
        section = f"reference config {settings.reference_config}"
        where_network, where_layer = f"{section} [all_layers]", f"{section} [model_layer_{{}}]"
        projections = architecture.projections.values() if reference["default_enabled"] else ()
        selected = {f"{layers_name}.{i}.{path}" for i in range(len(layers)) for path in projections}
    else:
        network, layer_wise = settings.modules, settings.layers
        section, where_network, where_layer = "lora", "lora.modules", "lora.layers.{}"
        selected = set(_target_selection(model, settings, layers_name))

    overrides: dict[str, ModuleSettings] = {}
    for name, module in network.items():
        path = _resolve_path(name, architecture, paths, where_network)
        for i in range(len(layers)):
            full = f"{layers_name}.{i}.{path}"
            overrides[full] = _merge(overrides.get(full), module)
    for index, table in layer_wise.items():
        where = where_layer.format(index)
        _check_layer_index(index, len(layers), where)
        for name, module in table.items():
            full = f"{layers_name}.{index}.{_resolve_path(name, architecture, paths, where)}"
            overrides[full] = _merge(overrides.get(full), module)
    for full, module in overrides.items():
        if module.enabled:
            selected.add(full)
        else:
            selected.discard(full)
    if not selected:
        raise UserInputError(f"{section}: every LoRA module is disabled; enable at least one")

    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    dropouts: dict[str, float] = {}
    for full in sorted(selected):
        module = overrides.get(full, ModuleSettings())
        module_r = module.r or settings.rank_pattern.get(get_pattern_key(settings.rank_pattern.keys(), full), r)
        module_alpha = module.alpha or settings.alpha_pattern.get(
            get_pattern_key(settings.alpha_pattern.keys(), full), alpha
        )
        module_dropout = dropout if module.dropout is None else module.dropout
        if module_r != r:
            rank_pattern[full] = module_r
        if module_alpha != alpha:
            alpha_pattern[full] = module_alpha
        if module_dropout != dropout:
            dropouts[full] = module_dropout
    resolved = settings.model_copy(
        update={
            "r": r,
            "alpha": alpha,
            "dropout": dropout,
            "target_modules": sorted(selected),
            "exclude_modules": None,
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "modules": {},
            "layers": {},
            "reference_config": None,
        }
    )
    return resolved, dropouts


def apply_module_dropouts(model: PeftModel, dropouts: dict[str, float]) -> None:
    """Sets each listed LoRA module's own dropout, since `peft.LoraConfig` has one dropout for all modules.

    Args:
        model: The model `get_peft_model` returned.
        dropouts: {full module name in the bare model: dropout probability}, from `resolve_lora_settings`.
    """
    adapter = model.active_adapter
    for name, p in dropouts.items():
        layer = model.get_submodule(f"base_model.model.{name}")
        if not hasattr(layer, "lora_dropout"):
            raise ValueError(f"{name} is not a LoRA layer of this model")
        layer.lora_dropout[adapter] = nn.Dropout(p) if p > 0 else nn.Identity()


def resolve_shortcut_specs(model: PreTrainedModel, settings: ShortcutSettings) -> dict[tuple[int, str], ShortcutSpec]:
    """The enabled shortcut connections of every layer with their r, alpha and dropout.

    Each connection starts from the section's r / alpha / dropout and is on when its kind is in `kinds` (with a
    reference config: when `[default]` is enabled); `modules[kind]` then `layers[i][kind]` override it, and an
    explicitly enabled kind is on even when `kinds` leaves it out. shortcut2 spans two layers, so layer 0 has none.

    Args:
        model: The bare transformers model.
        settings: The `shortcuts` section.

    Returns:
        {(layer index, kind): ShortcutSpec}, ordered by layer, then as in SHORTCUT_KINDS.

    Raises:
        UserInputError: the family is unsupported, a layer index is out of range, or the reference config is
            invalid or combined with explicit settings.
    """
    _, layers = transformer_layers(model, architecture_of(model))
    base = ModuleSettings(r=settings.r, alpha=settings.alpha, dropout=settings.dropout)
    network, layer_wise, where = settings.modules, settings.layers, "shortcuts.layers.{}"
    enabled_kinds = set(settings.kinds)
    if settings.reference_config:
        reference = settings.reference()
        base = base.model_copy(update={key: reference[key] for key in ("r", "alpha", "dropout") if key in reference})
        network, layer_wise = reference["modules"], reference["layers"]
        where = f"reference config {settings.reference_config} [model_layer_{{}}]"
        enabled_kinds = set(SHORTCUT_KINDS) if reference["default_enabled"] else set()
    for index in layer_wise:
        _check_layer_index(index, len(layers), where.format(index))

    specs: dict[tuple[int, str], ShortcutSpec] = {}
    for i in range(len(layers)):
        for kind in SHORTCUT_KINDS:
            if kind == "shortcut2" and i == 0:
                continue
            module = base.model_copy(update={"enabled": kind in enabled_kinds})
            for override in (network.get(kind), layer_wise.get(i, {}).get(kind)):
                if override is not None:
                    module = _merge(module, override)
            if module.enabled:
                specs[(i, kind)] = ShortcutSpec(r=module.r, alpha=module.alpha, dropout=module.dropout)
    return specs
