"""The registry of allocation methods: each registers its name, settings, builder and capabilities once.

In the spirit of PEFT's `register_peft_method`. Everything else is derived from the registered methods: the
config's `allocation` section (a union tagged by `method`), the checks of which `lora` and `shortcuts` settings a
method works with, and the adapter a run builds. No other module tests a method's name.

A method registers from a module of `ranktune.allocation.methods` that imports no torch: validating a config must
not pay for it (seconds), so builders import the method's implementation when they run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, TrainingArguments

    from ranktune.allocation.strategy import AllocationStrategy
    from ranktune.config import LoraSettings, RunConfig


class MethodSettings(BaseModel):
    """Base of a method's settings: the `allocation` section when `method` names it. Frozen once validated."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    def check_with_lora(self, lora: LoraSettings) -> None:
        """Checks that need the `lora` section as well (a rank bound by lora.r, ...).

        Raises:
            ValueError: naming the keys involved.
        """


def _steps_or_fraction(value: int | float) -> int | float:
    if isinstance(value, float) and value >= 1.0:
        raise ValueError(f"a fraction must be below 1, got {value}; give a whole number for steps")
    return value


StepsOrFraction = Annotated[int | float, AfterValidator(_steps_or_fraction)]
"""A number of optimizer steps (int) or a fraction (float below 1) of the run or of an epoch."""


@dataclass(frozen=True)
class Capabilities:
    """What a method works with and what it needs; the config refuses the rest with one message."""

    shortcuts: bool = False
    """Trains the `shortcuts` section's connections beside the LoRA modules."""
    plans: bool = True
    """Takes `lora.plan` (a `ranktune plan` file)."""
    per_module_settings: bool = True
    """Takes `lora.modules`, `lora.layers` and `lora.reference_config`."""
    rank_pattern: bool = True
    """Takes `lora.rank_pattern`, `lora.alpha_pattern` and `lora.rslora`."""
    dora: bool = False
    """Takes `lora.dora`."""
    calibration_batches: bool = False
    """May draw training batches before step 0 (`BuildContext.calibration_batches`)."""
    moves_ranks: Literal["never", "before_training", "during_training"] = "during_training"
    """When the method decides ranks: never (plain LoRA), once before step 0, or at optimizer steps."""


# The `lora` keys a capability governs, in the order the config reports them.
_LORA_KEYS: tuple[tuple[str, str], ...] = (
    ("dora", "dora"),
    ("rslora", "rank_pattern"),
    ("rank_pattern", "rank_pattern"),
    ("alpha_pattern", "rank_pattern"),
    ("plan", "plans"),
    ("modules", "per_module_settings"),
    ("layers", "per_module_settings"),
    ("reference_config", "per_module_settings"),
)


@dataclass(frozen=True)
class BuildContext:
    """What a builder may use besides the model and the config."""

    args: TrainingArguments
    train_dataset: Sized
    collator: Callable | None
    output_dir: Path
    seed: int

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(self.args.gradient_checkpointing)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch, as the Trainer counts them."""
        args = self.args
        per_batch = args.per_device_train_batch_size * args.world_size
        rows = len(self.train_dataset)
        batches = rows // per_batch if args.dataloader_drop_last else math.ceil(rows / per_batch)
        return max(1, math.ceil(batches / args.gradient_accumulation_steps))

    def total_steps(self) -> int:
        """Optimizer steps of the run as the Trainer will count them (it fixes the number in `on_train_begin`)."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        return max(1, math.ceil(self.args.num_train_epochs * self.steps_per_epoch()))

    def calibration_batches(self, count: int) -> list[dict[str, Any]]:
        """The first `count` training batches in dataset order, at the training batch size."""
        from ranktune.allocation.saliency import first_batches

        return first_batches(self.train_dataset, self.collator, self.args.per_device_train_batch_size, count)


@dataclass
class AdaptedModel:
    """What a builder returns: the PEFT-wrapped model and the strategy that moves its ranks (None: they stay)."""

    model: PeftModel
    strategy: AllocationStrategy | None = None


Builder = Callable[["PreTrainedModel", "RunConfig", BuildContext], AdaptedModel]


@dataclass(frozen=True)
class AllocationMethod:
    """A registered method."""

    name: str
    settings: type[MethodSettings]
    build: Builder
    capabilities: Capabilities


_METHODS: dict[str, AllocationMethod] = {}


def register_allocation_method(
    *, name: str, settings: type[MethodSettings], build: Builder, capabilities: Capabilities
) -> AllocationMethod:
    """Registers a method under `name`, which its settings class must declare as `method: Literal["name"]`.

    Raises:
        ValueError: the name is taken, or the settings class does not declare it.
    """
    if name in _METHODS:
        raise ValueError(f"allocation method '{name}' is already registered")
    field = settings.model_fields.get("method")
    if field is None or get_args(field.annotation) != (name,):
        raise ValueError(f"{settings.__name__} must declare `method: Literal['{name}']` to register as '{name}'")
    method = AllocationMethod(name, settings, build, capabilities)
    _METHODS[name] = method
    return method


def registered_methods() -> list[AllocationMethod]:
    """Every registered method, in registration order."""
    _register_builtins()
    return list(_METHODS.values())


def method_of(settings: MethodSettings) -> AllocationMethod:
    """The registered method whose settings these are."""
    _register_builtins()
    return _METHODS[settings.method]


def settings_union() -> Any:
    """The `allocation` section's type: the registered settings classes, tagged by `method`."""
    classes = tuple(method.settings for method in registered_methods())
    return Annotated[Union[classes], Field(discriminator="method")]  # noqa: UP007 - a tuple of classes needs Union


def check_compatibility(config: RunConfig) -> None:
    """Refuses `lora` and `shortcuts` settings the chosen method cannot honour, then its own cross-checks.

    Raises:
        ValueError: one message naming the method and the first key it does not support.
    """
    method = method_of(config.allocation)
    capabilities = method.capabilities
    if config.shortcuts and not capabilities.shortcuts:
        able = " or ".join(m.name for m in registered_methods() if m.capabilities.shortcuts)
        raise ValueError(
            f"shortcuts train with allocation.method {able}, not '{method.name}' "
            "(its rank allocation covers LoRA modules only)"
        )
    for key, capability in _LORA_KEYS:
        if getattr(config.lora, key) and not getattr(capabilities, capability):
            raise ValueError(f"allocation.method '{method.name}' does not support lora.{key}")
    config.allocation.check_with_lora(config.lora)


def build_adapter(model: PreTrainedModel, config: RunConfig, context: BuildContext) -> AdaptedModel:
    """Wraps the bare model as the config's method does, and sets up its strategy."""
    return method_of(config.allocation).build(model, config, context)


def _register_builtins() -> None:
    import ranktune.allocation.methods  # noqa: F401 - registers the built-in methods on import
