"""The run configuration: a YAML (or TOML / JSON) file validated into typed sections.

The key names are a contract that scripts outside the repository rely on. LoRA keys follow PEFT (`r`, `alpha`,
`target_modules`, `rank_pattern`, ...), with PEFT's own spellings (`lora_alpha`, `use_rslora`, ...) accepted as
aliases. The `training` section is handed to `transformers.TrainingArguments`, so every key documented there works.

Importing this module costs no torch or transformers: everything but the `training` keys' names and types is checked
without them, so a mistake elsewhere is reported in a fraction of a second (see `validate_config`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ranktune.adapters.shortcut_types import SHORTCUT_KINDS, ShortcutKind
from ranktune.allocation.methods.none import NoAllocation
from ranktune.allocation.registry import check_compatibility, registered_methods, settings_union
from ranktune.errors import UserInputError, did_you_mean

if TYPE_CHECKING:
    from ranktune.allocation.plan_file import Plan

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

Task = Literal["causal_lm", "classification"]
DataFormat = Literal["auto", "text", "prompt_completion", "chat", "classification"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class ModelConfig(_Section):
    """Which base model to adapt and how to load it."""

    name_or_path: str = Field(min_length=1)
    task: Task = "causal_lm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    trust_remote_code: bool = False
    revision: str | None = None
    attn_implementation: str | None = None
    num_labels: int | None = Field(default=None, ge=2)  # 1 would make transformers build a regression head


class DataConfig(_Section):
    """Where the examples come from and how they become token sequences."""

    train: str = Field(min_length=1)
    validation: str | None = None
    test: str | None = None
    subset: str | None = None
    format: DataFormat = "auto"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    max_length: int = Field(default=512, gt=0)
    packing: bool = False
    validation_split: float = Field(default=0.1, gt=0.0, lt=1.0)
    max_train_samples: int | None = Field(default=None, gt=0)
    max_eval_samples: int | None = Field(default=None, gt=0)
    max_test_samples: int | None = Field(default=None, gt=0)
    seed: int = 42


class ModuleSettings(_Section):
    """Per-module overrides of a LoRA module or a shortcut connection; unset fields keep the section's value."""

    r: int | None = Field(default=None, gt=0)
    alpha: float | None = Field(default=None, gt=0)
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    enabled: bool = True


PerModule = dict[str, ModuleSettings]
"""Network-wise settings: {module: settings} for that module in every layer."""
PerLayer = dict[int, dict[str, ModuleSettings]]
"""Layer-wise settings: {layer index: {module: settings}}, over the network-wise ones."""


# PEFT's `init_lora_weights` values that need nothing but the base model (pissa_niter_N too).
LORA_INITS = ("default", "gaussian", "orthogonal", "pissa", "olora")


class LoraSettings(_Section):
    """LoRA hyper-parameters, named as in `peft.LoraConfig`.

    `modules` (network-wise) and `layers` (layer-wise) set r, alpha, dropout or enabled per module; module names
    are the reference's abstract ones (q_proj, k_proj, v_proj, o_proj, w1, w2, gate) or paths inside a layer
    (`self_attn.q_proj`, `attention.self.query`). `reference_config` reads HeteroLoRA's TOML LoRA config instead.
    """

    r: int = Field(default=8, gt=0, validation_alias=AliasChoices("r", "lora_r"))
    alpha: float = Field(default=16.0, gt=0, validation_alias=AliasChoices("alpha", "lora_alpha"))
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, validation_alias=AliasChoices("dropout", "lora_dropout"))
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    rslora: bool = Field(default=False, validation_alias=AliasChoices("rslora", "use_rslora"))
    dora: bool = Field(default=False, validation_alias=AliasChoices("dora", "use_dora"))
    init: str = Field(default="default", validation_alias=AliasChoices("init", "init_lora_weights"))
    bias: Literal["none", "all", "lora_only"] = "none"
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    modules_to_save: list[str] | None = None
    plan: str | None = None  # a `ranktune plan` file: it replaces target_modules and sets each module's rank
    modules: PerModule = Field(default_factory=dict)
    layers: PerLayer = Field(default_factory=dict)
    reference_config: str | None = None  # HeteroLoRA's TOML (granularity network | layer)

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if not value:
            raise ValueError("must name at least one module, a regex, or 'all-linear'")
        if isinstance(value, str) and value != "all-linear":
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"is not a valid regular expression ({error})") from None
        return value

    @field_validator("init", mode="before")
    @classmethod
    def _known_init(cls, value: Any) -> str:
        if value is True:  # PEFT's `init_lora_weights: true`
            return "default"
        if value in LORA_INITS or (isinstance(value, str) and re.fullmatch(r"pissa_niter_[1-9][0-9]*", value)):
            return value
        raise ValueError(
            f"unknown initialisation {value!r}; expected one of {', '.join(LORA_INITS)} or pissa_niter_N "
            "(PEFT's init_lora_weights; EVA and the gradient method are allocation methods)"
        )

    def changes_base_weights(self) -> bool:
        """Whether `init` moves part of the base weights into the adapter at step 0 (PiSSA, OLoRA): the export
        then subtracts the initial adapter, so that the saved one applies to the original base."""
        return self.init in ("pissa", "olora") or self.init.startswith("pissa_niter_")

    @model_validator(mode="after")
    def _init_fits(self) -> LoraSettings:
        """Refuses before anything loads what PEFT would refuse at the init or only at the export after training."""
        if self.init == "orthogonal":
            odd = sorted(rank for rank in {self.r, *self.rank_pattern.values()} if rank % 2)
            if odd:
                raise ValueError(f"init 'orthogonal' needs even ranks; got {', '.join(map(str, odd))}")
        if not self.changes_base_weights():
            return self
        if self.dora or self.bias != "none":
            raise ValueError(
                f"init '{self.init}' cannot be converted for the original base with dora or a trained bias; "
                "use the default init for those"
            )
        patterned = self.rank_pattern or self.alpha_pattern or self.modules or self.layers or self.plan
        if self.rslora and (patterned or self.reference_config):
            raise ValueError(
                f"init '{self.init}' with rslora cannot be converted for the original base when modules have their "
                "own ranks or alphas (PEFT's conversion refuses it); drop rslora or the per-module settings"
            )
        return self

    @field_validator("rank_pattern")
    @classmethod
    def _positive_ranks(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {k: v for k, v in value.items() if v <= 0}
        if bad:
            raise ValueError(f"ranks must be > 0, got {bad}")
        return value

    def plan_file(self) -> Plan | None:
        """`plan` read and checked (once per version of the file; the config reads it when validated).

        Raises:
            UserInputError: the file is missing or not a plan that enables a LoRA module.
        """
        if self.plan is None:
            return None
        from ranktune.allocation.plan_file import read_plan  # it imports this module

        return read_plan(self.plan)

    def reference(self) -> dict[str, Any]:
        """`reference_config` read and checked (see `reference_toml.read_reference`)."""
        from ranktune.reference_toml import read_reference  # it imports this module

        return read_reference(self, "lora")


class ShortcutSettings(_Section):
    """HeteroLoRA's shortcut connections: a low-rank d×d map per kind and layer, added around or across sub-layers.

    residual1 / residual2 add s·BA to the residual path around attention / the FFN (base: identity); shortcut1
    carries a layer's input to its FFN output, shortcut2 the previous layer's FFN input to this layer's attention
    output (base: zero; not in layer 0). s = alpha / r; B starts at zero, so training starts from the base model.
    `modules` (per kind) and `layers` (per layer and kind) override r, alpha, dropout or enabled;
    `reference_config` reads HeteroLoRA's TOML shortcut config instead.
    """

    kinds: list[ShortcutKind] = Field(default_factory=lambda: list(SHORTCUT_KINDS), min_length=1)
    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=4.0, gt=0, validation_alias=AliasChoices("alpha", "shortcut_alpha"))
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, validation_alias=AliasChoices("dropout", "proj_dropout"))
    modules: dict[ShortcutKind, ModuleSettings] = Field(default_factory=dict)
    layers: dict[int, dict[ShortcutKind, ModuleSettings]] = Field(default_factory=dict)
    reference_config: str | None = None

    def reference(self) -> dict[str, Any]:
        """`reference_config` read and checked (see `reference_toml.read_reference`)."""
        from ranktune.reference_toml import read_reference  # it imports this module

        return read_reference(self, "shortcuts")


# The `allocation` section: one settings class per registered method, tagged by `method` (allocation/registry.py).
AllocationConfig = settings_union()

ServingForm = Literal["peft", "uniform", "gguf"]


class ExportSettings(_Section):
    """Serving forms written beside the adapter when training ends, into output_dir/serving (`ranktune export`'s
    forms: peft, uniform, gguf), each with every module above `max_rank` reduced to its best rank-`max_rank`
    approximation. The adapter in output_dir itself is always the canonical, uncapped one."""

    formats: list[ServingForm] = Field(default_factory=list)
    max_rank: int | None = Field(default=None, ge=1)


class RunConfig(_Section):
    """A whole training run."""

    model: ModelConfig
    data: DataConfig
    lora: LoraSettings = Field(default_factory=LoraSettings)
    allocation: AllocationConfig = Field(default_factory=NoAllocation)
    shortcuts: ShortcutSettings | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    export: ExportSettings = Field(default_factory=ExportSettings)
    output_dir: str = Field(default="runs/ranktune", min_length=1)

    @model_validator(mode="after")
    def _allocation_fits_lora(self) -> RunConfig:
        per_module = [key for key in ("modules", "layers", "reference_config") if getattr(self.lora, key)]
        if self.lora.plan and per_module:
            raise ValueError(f"lora.plan sets every module itself; remove lora.{per_module[0]} or the plan")
        if "gguf" in self.export.formats and self.model.task != "causal_lm":
            raise ValueError("export.formats: gguf is a llama.cpp adapter, for causal LMs only (model.task)")
        if "gguf" in self.export.formats and self.lora.modules_to_save:
            raise ValueError("export.formats: gguf holds LoRA factors only; lora.modules_to_save trains whole modules")
        if self.export.max_rank is not None and not self.export.formats:
            raise ValueError("export.max_rank caps the forms in export.formats, and none is given")
        check_compatibility(self)
        return self

    @model_validator(mode="after")
    def _read_named_files(self) -> RunConfig:
        """Reads the plan and reference configs now, so that their mistakes are reported before anything loads."""
        self.lora.plan_file()
        if self.lora.reference_config:
            self.lora.reference()
        if self.shortcuts is not None and self.shortcuts.reference_config:
            self.shortcuts.reference()
        return self

    @property
    def seed(self) -> int:
        """The run's seed (`training.seed`, TrainingArguments' default 42)."""
        return int(self.training.get("seed", 42))

    @field_validator("training")
    @classmethod
    def _training_values(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_training_values(value)


def _training_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


_RESERVED_TRAINING_KEYS = {"output_dir": "use the top-level 'output_dir'"}
# Names from transformers 4.x that users still type; transformers 5 folded them into these fields.
TRAINING_ALIASES = {"warmup_ratio": "warmup_steps", "evaluation_strategy": "eval_strategy"}


def rename_training_aliases(values: dict[str, Any]) -> dict[str, Any]:
    """Maps 4.x names onto their 5.x fields (`warmup_steps` below 1 is a fraction of the steps, like warmup_ratio)."""
    return {TRAINING_ALIASES.get(key, key): value for key, value in values.items()}


_STEPS_OR_FRACTION = "must be > 0: a number of steps, or a fraction (below 1) of the run"
# TrainingArguments numbers that torch or the Trainer refuse only once training starts, after the model has loaded,
# or that they accept and then train nothing. What TrainingArguments checks itself (warmup_steps >= 0, ...) is left
# to it: `ranktune train` builds the arguments before it loads anything.
_TRAINING_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "learning_rate": (lambda v: v >= 0, "must be >= 0"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "adam_beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "adam_epsilon": (lambda v: v >= 0, "must be >= 0"),
    "per_device_train_batch_size": (lambda v: v >= 1, "must be at least 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "must be at least 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "must be at least 1"),
    "max_steps": (lambda v: v > 0 or v == -1, "must be a number of steps > 0, or -1 to train for num_train_epochs"),
    "logging_steps": (lambda v: v > 0, _STEPS_OR_FRACTION),
    "save_steps": (lambda v: v > 0, _STEPS_OR_FRACTION),
    "eval_steps": (lambda v: v > 0, _STEPS_OR_FRACTION),
    "dataloader_num_workers": (lambda v: v >= 0, "must be >= 0"),
}


def _as_number(value: Any) -> float | None:
    """A value for a range check; None for what is no number (the type check names it: a bool, a word, None)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def check_training_values(values: dict[str, Any]) -> dict[str, Any]:
    """Checks the `training` values that need no transformers: reserved keys and the ranges of numbers.

    Returns:
        The values with 4.x aliases renamed.

    Raises:
        ValueError: naming the first bad key (`'training.key': ...`) and what it expects.
    """
    for old_name, name in TRAINING_ALIASES.items():
        if old_name in values and name in values:  # renaming would silently keep one of the two
            raise ValueError(f"'training.{old_name}': the transformers 4 name of training.{name}, set too; keep one")
    values = rename_training_aliases(values)
    for key, value in values.items():
        if key in _RESERVED_TRAINING_KEYS:
            raise ValueError(f"'training.{key}': not allowed here; {_RESERVED_TRAINING_KEYS[key]}")
        number = _as_number(value)
        if key in _TRAINING_RANGES and number is not None:
            in_range, expected = _TRAINING_RANGES[key]
            if not in_range(number):
                raise ValueError(f"'training.{key}': {expected} (got {value})")
    epochs, max_steps = _as_number(values.get("num_train_epochs")), _as_number(values.get("max_steps"))
    if epochs is not None and (epochs < 0 or (epochs == 0 and not (max_steps and max_steps > 0))):
        raise ValueError(
            "'training.num_train_epochs': must be > 0 (0 would save an untrained adapter as if trained), unless "
            f"training.max_steps > 0 sets the length of the run (got {values['num_train_epochs']})"
        )
    return values


def _simple_types(annotation: Any) -> tuple[type, ...] | None:
    """The plain Python types an annotation allows, or None when it allows anything we do not check."""
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, Any)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        allowed: list[type] = []
        for arg in typing.get_args(annotation):
            if arg is type(None):
                continue
            inner = _simple_types(arg)
            if inner is None:
                return None
            allowed.extend(inner)
        return tuple(allowed)
    if annotation in (int, float, bool, str):
        return (annotation,)
    return None


def _type_matches(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and (int in allowed or float in allowed):
        return True
    return any(isinstance(value, t) for t in allowed if t is not bool)


def _coerce_number(value: Any, allowed: tuple[type, ...]) -> Any:
    """YAML 1.1 reads `1e-4` as a string; users mean a number."""
    if isinstance(value, str) and (float in allowed or int in allowed):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if int in allowed and float not in allowed and number.is_integer() else number
    return value


def _accepts_str_not_bool(annotation: Any) -> bool:
    """True for fields like `eval_strategy: IntervalStrategy | str`, where YAML's `no` (read as False) means "no"."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    members = set(args) or {annotation}
    return str in members and bool not in members


# Fields whose type hint is narrower than what TrainingArguments accepts: transformers 5 hints `fsdp: str | None` for
# its command-line parser but documents and takes `fsdp=True` (the string form is the legacy one).
_TRAINING_TYPES: dict[str, tuple[type, ...]] = {"fsdp": (bool, str)}


def check_training_arguments(values: dict[str, Any]) -> dict[str, Any]:
    """Checks `training` keys against `TrainingArguments`: names, and types where the field's type is simple.

    Imports transformers (and with it torch), which takes seconds: `validate_config` calls it last.

    Returns:
        The values with numeric strings (`1e-4`) turned into numbers and YAML's `no` (False) into "no".

    Raises:
        ValueError: naming the first bad key and what it expects.
    """
    fields = _training_fields()
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments, include_extras=False)
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            names = list(fields) + list(TRAINING_ALIASES)
            raise ValueError(f"unknown key 'training.{key}' (not a TrainingArguments field).{did_you_mean(key, names)}")
        annotation = hints.get(key, fields[key].type)
        if value is False and key not in _TRAINING_TYPES and _accepts_str_not_bool(annotation):
            value = "no"
        allowed = _TRAINING_TYPES.get(key) or _simple_types(annotation)
        if value is not None and allowed:
            value = _coerce_number(value, allowed)
            if not _type_matches(value, allowed):
                expected = " or ".join(t.__name__ for t in allowed)
                raise ValueError(f"'training.{key}' expects {expected}, got {type(value).__name__} {value!r}")
        checked[key] = value
    return checked


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping gives a key twice."""

    def __init__(self, key: Any, first_line: int, mark: yaml.Mark) -> None:
        super().__init__(None, None, f"duplicate key '{key}' (first at line {first_line}); give each key once", mark)
        self.key = key


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing a key given twice in one mapping (SafeLoader silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader refuses it itself
            if key in first_lines:
                raise _DuplicateKeyError(key, first_lines[key], key_node.start_mark)
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads`' object_pairs_hook: a JSON object that gives a key twice is refused, not reduced to the last."""
    mapping: dict[str, Any] = {}
    for key, value in pairs:
        if key in mapping:
            raise ValueError(f"duplicate key '{key}' in one object; give each key once")
        mapping[key] = value
    return mapping


def _read_mapping(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise UserInputError(f"{path} is a directory; expected a config file (.yaml, .toml or .json)")
    if not path.is_file():
        raise UserInputError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read config file {path}: {error}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text, object_pairs_hook=_unique_json_keys)
        else:
            data = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserInputError(f"malformed YAML in {path}{where}: {problem}") from None
    except (tomllib.TOMLDecodeError, ValueError) as error:  # JSONDecodeError and a duplicate key are ValueErrors
        raise UserInputError(f"malformed {suffix[1:].upper()} in {path}: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserInputError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `dotted.key=value` overrides; values are parsed as YAML scalars (`8`, `true`, `1e-4`, `[a, b]`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"override '{item}' is not of the form dotted.key=value")
        try:
            value = yaml.load(raw, Loader=UniqueKeyLoader)
        except _DuplicateKeyError as error:
            raise UserInputError(f"override '{item}': duplicate key '{error.key}'; give each key once") from None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserInputError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


_ALLOCATION_KEYS = {key for method in registered_methods() for key in method.settings.model_fields}


def _section_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, str]:
    """Walks the config models along an error location; returns the model that owns the last key and its path."""
    model: type[BaseModel] | None = RunConfig
    names: list[str] = []
    members: dict[str, type[BaseModel]] = {}
    for part in loc[:-1]:
        if str(part) in members:  # the tag pydantic puts in the location of a discriminated union
            model, members = members[str(part)], {}
            continue
        names.append(str(part))
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        members = {
            str(typing.get_args(m.model_fields["method"].annotation)[0]): m
            for m in typing.get_args(annotation)
            if isinstance(m, type) and issubclass(m, BaseModel) and "method" in m.model_fields
        }
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model, ".".join([*names, str(loc[-1])])


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    if not loc:  # a check across sections, whose message names the keys itself
        return error["msg"].removeprefix("Value error, ")
    model, dotted = _section_at(loc)
    if error["type"] == "extra_forbidden":
        names = list(model.model_fields) if model else []
        if model:
            for field in model.model_fields.values():
                alias = field.validation_alias
                if isinstance(alias, AliasChoices):
                    names.extend(str(c) for c in alias.choices)
        method = model.model_fields.get("method") if model else None
        if method is not None and str(loc[-1]) in _ALLOCATION_KEYS:  # a key of another allocation method
            chosen = typing.get_args(method.annotation)[0]
            own = [n for n in names if n != "method"]
            takes = f"takes {', '.join(own)}" if own else "takes no other keys"
            return (
                f"'{dotted}' does not apply: allocation.method '{chosen}' {takes}; to switch methods, replace the "
                f"whole section, e.g. `allocation={{method: {chosen}}}`"
            )
        return f"unknown key '{dotted}'.{did_you_mean(str(loc[-1]), names)}"
    if error["type"] == "union_tag_invalid":
        context = error.get("ctx", {})
        return f"unknown {dotted}.method '{context.get('tag')}'; expected one of {context.get('expected_tags')}"
    if error["type"] == "missing":
        return f"missing required key '{dotted}'"
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith(f"'{dotted}."):  # the validator named the key inside its field itself
        return message
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"'{dotted}': {message}{shown}"


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Reads, overrides and validates a run config.

    Raises:
        UserInputError: the file is missing, malformed, or a key is unknown, of the wrong type or out of range.
    """
    path = Path(path)
    data = apply_overrides(_read_mapping(path), overrides or [])
    data.setdefault("output_dir", str(Path("runs") / path.stem))
    return validate_config(data, source=str(path))


def validate_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validates a config mapping, turning pydantic's errors into one readable message.

    The `training` keys' names and types are checked last, against `TrainingArguments`: importing it imports torch
    (seconds), so every other mistake, from the file or from an override, is reported before that.

    Raises:
        UserInputError: the first problems found, each naming its key and what is expected.
    """
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as error:
        lines = [_describe(e) for e in error.errors()]
        detail = "; ".join(lines)  # one line, as every error is
        raise UserInputError(f"invalid config {source}: {detail}") from None
    if not config.training:
        return config
    try:
        training = check_training_arguments(config.training)
    except ValueError as error:
        raise UserInputError(f"invalid config {source}: {error}") from None
    return config.model_copy(update={"training": training})
