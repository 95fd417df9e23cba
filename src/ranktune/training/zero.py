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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ranktune.allocation.registry import method_of, registered_methods
from ranktune.config import RunConfig
from ranktune.errors import UserInputError

SAVE_GATHERED = "stage3_gather_16bit_weights_on_model_save"
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


def deepspeed_requested(values: dict[str, Any]) -> bool:
    """Whether the run trains under DeepSpeed: `training.deepspeed`, or `accelerate launch` with a DeepSpeed
    config (which sets ACCELERATE_USE_DEEPSPEED)."""
    return bool(values.get("deepspeed")) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


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
    read into a dict, the batch sizes and clipping taken from the `training` section where it leaves them
    out, and ZeRO-3 set to save whole adapter tensors in checkpoints (the adapter file `--resume` needs).

    Raises:
        UserInputError: a method that moves ranks during training, a quantized base, an initialisation other than
            PEFT's default, FSDP as well, no deepspeed package, DeepSpeed from an accelerate config, or an
            unreadable DeepSpeed config.
    """
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
    if not values.get("deepspeed"):
        raise UserInputError(
            "DeepSpeed from an accelerate config is not tested by ranktune: launch with torchrun (or accelerate "
            "launch without DeepSpeed) and give training.deepspeed a DeepSpeed config, e.g. "
            "training.deepspeed=examples/deepspeed/zero3.json"
        )
    deepspeed = read_deepspeed_config(values["deepspeed"])
    for key in BATCH_KEYS:  # the Trainer fills "auto" from the training section; a key left out would not be
        deepspeed.setdefault(key, "auto")
    zero = dict(deepspeed.get("zero_optimization") or {})
    if zero.get("stage") == 3:
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


@contextlib.contextmanager
def gathered_adapter(model: nn.Module) -> Iterator[None]:
    """Under ZeRO-3, every process gathers the whole adapter tensors (not the base model's) for the duration: a
    collective, so every process enters it. Elsewhere (ZeRO-2, FSDP2, DDP) the adapter is whole already."""
    if not zero3_enabled():
        yield
        return
    import deepspeed

    from ranktune.training.sharding import adapter_modules

    parameters = [parameter for module in adapter_modules(model) for parameter in module.parameters(recurse=False)]
    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        yield


def _deepspeed_checkpoint_globals() -> list[type]:
    """The classes DeepSpeed's own checkpoint files hold besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, ZeroStageEnum]


def _load_weights_only(self: Any, path: str, map_location: Any = None) -> Any:
    """DeepSpeed's `TorchCheckpointEngine.load` without unpickling arbitrary objects (it passes weights_only=False):
    tensors, containers and DeepSpeed's two state classes only.

    Raises:
        UserInputError: the file holds anything else (a checkpoint folder handed over by someone else could run
            code through it).
    """
    import torch

    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[-1] if str(error) else "not a checkpoint file"
        raise UserInputError(
            f"--resume: '{path}' holds pickled objects other than tensors and DeepSpeed's own state ({reason}); "
            "ranktune does not unpickle them (that can run code): resume only from checkpoints your own runs wrote"
        ) from None


class WeightsOnlyDeepSpeedCheckpoints:
    """Trainer mixin: under DeepSpeed, its checkpoint files are read without unpickling arbitrary objects
    (`_load_weights_only`). Put it before the Trainer class in the bases."""

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_deepspeed_enabled:
            from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

            TorchCheckpointEngine.load = _load_weights_only
        return super().train(*args, **kwargs)
