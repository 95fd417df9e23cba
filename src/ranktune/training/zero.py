"""DeepSpeed ZeRO-2 / ZeRO-3: what ranktune runs under it, and the adapter gathered where a step needs it whole.

DeepSpeed's optimizer keeps its own fp32 copy of every trained tensor (ZeRO-3 also partitions the tensors
themselves) and writes it back into the model after each step, so an edit made to a model parameter between steps
is lost at the next one. The methods that decide ranks during training (L1RA, AdaLoRA, HeteroLoRA) edit rows of A,
columns of B, gates and masks between steps; they are refused under DeepSpeed (FSDP2 runs them: `sharding.py`).
Plain LoRA and the methods that decide before step 0 (EVA, gradient) edit nothing once training starts; they run.

The base model is loaded whole on every process before DeepSpeed is set up (ranktune does not load under
`zero.Init`), so calibration before step 0 sees the same model as on one process; ZeRO-3 partitions it when the
Trainer starts. After training, the adapter's tensors are gathered on every process for the export
(`gathered_adapter`); the base model stays partitioned.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ranktune.allocation.registry import method_of, registered_methods
from ranktune.config import RunConfig
from ranktune.errors import UserInputError

SAVE_GATHERED = "stage3_gather_16bit_weights_on_model_save"
AUTO_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


def deepspeed_requested(values: dict[str, Any]) -> bool:
    """Whether the run trains under DeepSpeed: `training.deepspeed`, or `accelerate launch` with a DeepSpeed
    config (which sets ACCELERATE_USE_DEEPSPEED, read as transformers reads it)."""
    from transformers.utils import strtobool

    return bool(values.get("deepspeed")) or bool(strtobool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")))


def read_deepspeed_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config as a dict: `training.deepspeed` gives one inline or the path of a JSON file.

    Raises:
        UserInputError: the file is missing or not a JSON object.
    """
    if isinstance(value, dict):
        return dict(value)
    path = Path(value)
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserInputError(f"training.deepspeed: no file '{path}'; expected a DeepSpeed JSON config") from None
    except (OSError, json.JSONDecodeError) as error:
        raise UserInputError(f"training.deepspeed: cannot read '{path}' as JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise UserInputError(f"training.deepspeed: '{path}' holds a JSON {type(loaded).__name__}, expected an object")
    return loaded


def check_deepspeed(config: RunConfig, values: dict[str, Any]) -> dict[str, Any]:
    """Refuses what ranktune does not run under DeepSpeed; returns the training values with the DeepSpeed config
    read into a dict, the batch sizes and clipping taken from the `training` section where it leaves them out, and
    ZeRO-3 set to save whole adapter tensors in checkpoints (the adapter file `--resume` needs).

    Raises:
        UserInputError: DeepSpeed from an accelerate config, a method that moves ranks during training, a quantized
            base, an initialisation other than PEFT's default, FSDP as well, no deepspeed package, an unreadable
            DeepSpeed config, a ZeRO stage other than 2 or 3, or a checkpoint engine other than DeepSpeed's default.
    """
    if not values.get("deepspeed"):
        raise UserInputError(
            "DeepSpeed from an accelerate config is not tested by ranktune: launch with torchrun (or accelerate "
            "launch without DeepSpeed) and give training.deepspeed a DeepSpeed config, e.g. "
            "training.deepspeed=examples/deepspeed/zero3.json"
        )
    method = method_of(config.allocation)
    if method.capabilities.moves_ranks == "during_training":
        runnable = ", ".join(m.name for m in registered_methods() if m.capabilities.moves_ranks != "during_training")
        raise UserInputError(
            f"allocation.method '{method.name}' with DeepSpeed is not supported: it edits the adapter between "
            "optimizer steps, and DeepSpeed's optimizer overwrites such edits from its own copy of the weights at "
            f"the next step. Train it with training.fsdp: true (FSDP2) or plain data parallel; under DeepSpeed "
            f"ranktune runs {runnable}"
        )
    if config.model.quantization != "none":
        raise UserInputError(
            f"model.quantization: '{config.model.quantization}' with DeepSpeed is not tested by ranktune; train a "
            "quantized base on one GPU or with plain data parallel"
        )
    if config.lora.init != "default":
        raise UserInputError(
            f"lora.init: '{config.lora.init}' with DeepSpeed is not tested by ranktune; leave lora.init out or "
            "train without DeepSpeed"
        )
    if values.get("fsdp"):
        raise UserInputError("training.deepspeed and training.fsdp both shard the model: choose one")
    if importlib.util.find_spec("deepspeed") is None:
        raise UserInputError(
            "training.deepspeed needs the deepspeed package: pip install 'ranktune[deepspeed]' (on a machine "
            "without CUDA, set DS_BUILD_OPS=0 when installing and DS_ACCELERATOR=cpu when running)"
        )
    deepspeed = read_deepspeed_config(values["deepspeed"])
    zero = dict(deepspeed.get("zero_optimization") or {})
    if zero.get("stage") not in (2, 3):
        raise UserInputError(
            f"training.deepspeed: zero_optimization.stage {zero.get('stage', 0)} is not tested by ranktune; "
            "expected 2 or 3"
        )
    checkpoint = deepspeed.get("checkpoint") or {}
    engines = ["checkpoint.load_universal"] if checkpoint.get("load_universal") else []
    engines += ["checkpoint.writer"] if checkpoint.get("writer") is not None else []  # as DeepSpeed reads them
    engines += ["datastates_ckpt"] if deepspeed.get("datastates_ckpt", False) is not False else []
    if engines:
        raise UserInputError(
            f"training.deepspeed: {', '.join(engines)} reads checkpoints with a loader that unpickles arbitrary "
            "objects; ranktune resumes only through DeepSpeed's default checkpoint engine, read weights-only: "
            "leave it out"
        )
    for key in AUTO_KEYS:  # the Trainer fills "auto" from the training section; a key left out would not be
        deepspeed.setdefault(key, "auto")
    if zero["stage"] == 3:
        if zero.get(SAVE_GATHERED) is False:
            raise UserInputError(
                f"training.deepspeed: zero_optimization.{SAVE_GATHERED}: false leaves checkpoints without the "
                "adapter file that --resume and the export read; leave it out or set it to true"
            )
        zero[SAVE_GATHERED] = True
        deepspeed["zero_optimization"] = zero
    return {**values, "deepspeed": deepspeed}


def zero3_enabled() -> bool:
    """Whether the Trainer of this run partitions parameters (DeepSpeed ZeRO-3)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 has partitioned the model's parameters (it does when training starts)."""
    return zero3_enabled() and any(hasattr(parameter, "ds_id") for parameter in model.parameters())


def _adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trained tensors and those named `lora_*`: the adapter, without a base weight that shares their module."""
    return [parameter for name, parameter in model.named_parameters() if parameter.requires_grad or ".lora_" in name]


@contextlib.contextmanager
def gathered_adapter(model: nn.Module) -> Iterator[None]:
    """Under ZeRO-3, every process gathers the whole adapter tensors (not the base model's) for the duration: a
    collective, so every process enters it. Elsewhere (ZeRO-2, FSDP2, DDP) the adapter is whole already."""
    if not partitioned(model):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(_adapter_parameters(model), modifier_rank=None):
        yield


def _deepspeed_checkpoint_globals() -> list[type]:
    """The classes DeepSpeed's own checkpoint files hold besides tensors and plain containers: the loss scalers,
    the ZeRO stage, and ZeRO-1/2's map of each parameter's slice in the flat partition."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str, map_location: Any = None, allowed: list[type] | None = None) -> Any:
    """A DeepSpeed checkpoint file read without unpickling arbitrary objects: tensors, containers and `allowed`
    classes (default: DeepSpeed's own state classes) only.

    Raises:
        UserInputError: the file holds anything else (a checkpoint folder handed over by someone else could run
            code through it), naming what it holds.
    """
    import torch

    allowed = _deepspeed_checkpoint_globals() if allowed is None else allowed
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\.|\n|$)", str(error))  # torch's own words
        what = f" ({found.group(1)})" if found else ""
        raise UserInputError(
            f"--resume: '{path}' holds pickled objects other than tensors and DeepSpeed's own state{what}; ranktune "
            "does not unpickle them (that can run code): resume only from checkpoints your own runs wrote"
        ) from None


class WeightsOnlyDeepSpeedCheckpoints:
    """Trainer mixin: under DeepSpeed, its checkpoint files are read without unpickling arbitrary objects
    (`load_weights_only` in place of DeepSpeed's default engine's loader, for the duration of `train`), and
    DeepSpeed from anywhere but `training.deepspeed` is refused. Put it before the Trainer class in the bases."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if not self.is_deepspeed_enabled:
            return super().train(*args, **kwargs)
        if not self.args.deepspeed:  # accelerate's plugin from the environment, past `check_deepspeed`
            raise UserInputError(
                "DeepSpeed from an accelerate config is not tested by ranktune: give training.deepspeed a DeepSpeed "
                "config instead"
            )
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        original = TorchCheckpointEngine.load
        TorchCheckpointEngine.load = lambda engine, path, map_location=None: load_weights_only(path, map_location)
        try:
            return super().train(*args, **kwargs)
        finally:
            TorchCheckpointEngine.load = original
