"""The registry of allocation methods: each registers its name, settings, builder and capabilities once.

In the spirit of PEFT's `register_peft_method`. Everything else is derived from the registered methods: the
config's `allocation` section (a union tagged by `method`), the checks of which `lora` and `shortcuts` settings a
method works with, and the adapter a run builds. No other module tests a method's name.

A method registers from a module of `ranktune.allocation.methods` that imports no torch: validating a config must
not pay for it (seconds), so builders import the method's implementation when they run. The config's types are
built from the registry when `ranktune.config` is first imported; registering a method after that is refused.
"""

from __future__ import annotations

import dataclasses
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
    """What a method works with and what it needs; the config refuses the rest with one message. Every field is
    required, so a new method declares each one."""

    shortcuts: bool
    """Trains the `shortcuts` section's connections beside the LoRA modules."""
    plans: bool
    """Takes `lora.plan` (a `ranktune plan` file)."""
    per_module_settings: bool
    """Takes `lora.modules`, `lora.layers` and `lora.reference_config`."""
    rank_pattern: bool
    """Takes `lora.rank_pattern`, `lora.alpha_pattern` and `lora.rslora` (PEFT's per-module ranks and scales)."""
    dora: bool
    """Takes `lora.dora`."""
    lora_init: bool
    """Takes `lora.init` other than the default (PEFT's gaussian, orthogonal, PiSSA and OLoRA initialisations)."""
    calibration_batches: bool
    """Draws training batches before step 0 (`BuildContext.calibration_batches` refuses the others)."""
    moves_ranks: Literal["never", "before_training", "during_training"]
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
    calibration_allowed: bool = True
    """Set by `build_adapter` from the method's `calibration_batches` capability."""

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the run trains with gradient checkpointing (PEFT prepares the model for it)."""
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

    def calibration_batches(
        self, count: int, batch_size: int | None = None, shard: bool = False
    ) -> list[dict[str, Any]]:
        """The first `count` training batches in dataset order, of `batch_size` rows (default: the training batch
        size). With `shard`, each of the run's processes takes every world_size-th of them (process k: k, k + W, ...),
        for a method that gathers what it computes from them across processes.

        Raises:
            RuntimeError: the method did not declare the `calibration_batches` capability.
        """
        if not self.calibration_allowed:
            raise RuntimeError("this allocation method draws calibration batches: register it with that capability")
        from ranktune.allocation.saliency import first_batches

        size = batch_size or self.args.per_device_train_batch_size
        batches = first_batches(self.train_dataset, self.collator, size, count)
        if not shard:
            return batches
        return batches[self.args.process_index :: self.args.world_size]

    def sampled_batches(self, count: int, draw: int) -> list[dict[str, Any]]:
        """`count` global batches of training rows drawn at random without replacement, as batches of the
        per-process size (count x world_size of them, the same list on every process: scoring shares them out).

        The rows are a prefix of a permutation of the training set seeded by (the run's seed, `draw`): the same
        rows whatever the number of processes, and other rows for another `draw`.

        Raises:
            RuntimeError: the method did not declare the `calibration_batches` capability.
        """
        if not self.calibration_allowed:
            raise RuntimeError("this allocation method draws calibration batches: register it with that capability")
        import torch

        size = self.args.per_device_train_batch_size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        order = torch.randperm(len(self.train_dataset), generator=generator)[: count * size * self.args.world_size]
        chosen = order.tolist()
        return [
            self.collator([self.train_dataset[i] for i in chosen[start : start + size]])
            for start in range(0, len(chosen), size)
        ]


@dataclass
class AdaptedModel:
    """What a builder returns: the PEFT-wrapped model, the strategy that moves its ranks (None: they stay), and for
    an init that changes the base weights (PiSSA, OLoRA) the adapter as it was at step 0, which the export subtracts
    so that the saved adapter applies to the original base."""

    model: PeftModel
    strategy: AllocationStrategy | None = None
    initial_adapter: Path | None = None


Builder = Callable[["PreTrainedModel", "RunConfig", BuildContext], AdaptedModel]


@dataclass(frozen=True)
class AllocationMethod:
    """A registered method."""

    name: str
    settings: type[MethodSettings]
    build: Builder
    capabilities: Capabilities
    history_files: tuple[str, ...]
    """Files the method's strategy writes into output_dir beside rank_history.jsonl (its `history_files`)."""


_METHODS: dict[str, AllocationMethod] = {}
_config_built = False  # set once the config's types are derived from the registry


def register_allocation_method(
    *,
    name: str,
    settings: type[MethodSettings],
    build: Builder,
    capabilities: Capabilities,
    history_files: tuple[str, ...] = (),
) -> AllocationMethod:
    """Registers a method under `name`, which its settings class must declare as `method: Literal["name"]`.

    Raises:
        ValueError: the name is taken, or the settings class does not declare it.
        RuntimeError: the config's types were already built (register from `ranktune.allocation.methods`).
    """
    if _config_built:
        raise RuntimeError(
            f"allocation method '{name}' registered after ranktune.config was imported: the config would not know "
            "it; register it from a module listed in ranktune.allocation.methods.BUILTINS"
        )
    if name in _METHODS:
        raise ValueError(f"allocation method '{name}' is already registered")
    field = settings.model_fields.get("method")
    if field is None or get_args(field.annotation) != (name,):
        raise ValueError(f"{settings.__name__} must declare `method: Literal['{name}']` to register as '{name}'")
    method = AllocationMethod(name, settings, build, capabilities, history_files)
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


def history_files() -> tuple[str, ...]:
    """Every registered method's history files (what a run may write beside rank_history.jsonl)."""
    return tuple(dict.fromkeys(name for method in registered_methods() for name in method.history_files))


def settings_union() -> Any:
    """The `allocation` section's type: the registered settings classes, tagged by `method`. From here on, the
    registry is closed."""
    global _config_built
    classes = tuple(method.settings for method in registered_methods())
    _config_built = True
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
    if config.lora.init != "default" and not capabilities.lora_init:
        able = " or ".join(m.name for m in registered_methods() if m.capabilities.lora_init)
        raise ValueError(
            f"lora.init '{config.lora.init}' trains with allocation.method {able}, not '{method.name}' "
            "(it sets the initial factors itself)"
        )
    config.allocation.check_with_lora(config.lora)


def build_adapter(model: PreTrainedModel, config: RunConfig, context: BuildContext) -> AdaptedModel:
    """Wraps the bare model as the config's method does, and sets up its strategy."""
    method = method_of(config.allocation)
    context = dataclasses.replace(context, calibration_allowed=method.capabilities.calibration_batches)
    return method.build(model, config, context)


def _register_builtins() -> None:
    import ranktune.allocation.methods  # noqa: F401 - registers the built-in methods on import
