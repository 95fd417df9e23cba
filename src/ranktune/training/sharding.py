"""FSDP2 with a whole adapter: the frozen base model is sharded, every adapter tensor stays whole on each process.

The base holds all but a fraction of a percent of the parameters, so sharding it is where FSDP saves memory. The
adapter's tensors (LoRA's A and B, L1RA's gates and masks, AdaLoRA's singular values, shortcut connections, trained
heads) are left out of FSDP (`ignored_params`) and stay plain tensors, identical on every process, exactly as under
DDP: every allocation method reads and edits them (rows of A, columns of B, gates, optimizer state) with the same
code as on one process, and every process takes the same decisions. Their gradients are averaged over processes at
the end of each accumulation window, as DDP would. The cost: each process keeps a whole copy of the adapter and its
optimizer state (LoRA r 16 on every linear layer of an 8B model: about 42M parameters, 0.7 GB in fp32 with Adam).

FSDP1 flattens parameters and cannot leave out tensors a strategy edits in place; it is refused (see
`training/arguments.py`). accelerate shards only on GPUs and other accelerators: on CPU it runs a `training.fsdp` run
as DDP without saying so, which `ranktune train` reports.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ranktune.console import progress
from ranktune.errors import UserInputError


def adapter_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that own an adapter tensor directly: a trainable parameter, or one named `lora_*` (L1RA's gate,
    which starts frozen). FSDP leaves their parameters out of its shards."""
    owners = []
    for module in model.modules():
        own = list(module.named_parameters(recurse=False))
        if any(parameter.requires_grad or name.startswith("lora_") for name, parameter in own):
            owners.append(module)
    return owners


class AverageReplicatedGradients(TrainerCallback):
    """Keeps the whole (FSDP-ignored) tensors that the Trainer's optimizer steps identical on every process:
    broadcast from process 0 when training starts, gradients averaged once per accumulation window (a hook on the
    last accumulated gradient). Tensors a strategy steps itself (L1RA's gates) are reduced by the strategy."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.hooked: set[int] = set()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer=None,
                       **kwargs):  # fmt: skip
        from torch.distributed.tensor import DTensor

        if optimizer is None or not dist.is_initialized() or dist.get_world_size() == 1:
            return
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if isinstance(parameter, DTensor) or not parameter.requires_grad:
                    continue
                with torch.no_grad():
                    dist.broadcast(parameter.data, src=0)
                if id(parameter) not in self.hooked:  # `train()` may run twice on one model
                    parameter.register_post_accumulate_grad_hook(self._average)
                    self.hooked.add(id(parameter))

    def _average(self, parameter: torch.Tensor) -> None:
        if self.accelerator.sync_gradients:  # the last micro-batch of the window: the sum is complete
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.AVG)


def complete_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Gives every Adam / AdamW parameter without state (it never had a gradient: a module HeteroLoRA keeps switched
    off) the state Adam would create at its first step: step 0, zero moments. torch.distributed.checkpoint, which
    FSDP2 checkpoints go through, refuses to load an optimizer state that lacks a trainable parameter; Adam steps
    from this state exactly as from none. Other optimizers are left as they are."""
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper
        optimizer = optimizer.optimizer
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if not parameter.requires_grad or optimizer.state.get(parameter):
                continue
            on_device = group.get("fused") or group.get("capturable")  # where Adam itself keeps `step`
            state = {
                "step": torch.tensor(0.0, dtype=torch.float32, device=parameter.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(parameter, memory_format=torch.preserve_format),
            }
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            optimizer.state[parameter] = state


FSDP1_REFUSAL = (
    "fsdp_version 1 (FSDP1) is not supported: it flattens parameters into shards, while allocation methods edit "
    "rows of A, columns of B and gates in place; use fsdp_version: 2"
)


QUANTIZED_REFUSAL = "a quantized base is not tested under FSDP2; train it on one GPU or with DDP"


def check_plugin(plugin, model: nn.Module | None = None) -> None:
    """Refuses the FSDP settings (from `training.fsdp_config` or an accelerate config) that cannot keep the adapter
    whole or that ranktune does not test; with `model`, also what the model itself brings.

    Raises:
        UserInputError: naming the setting and what to use instead.
    """
    refusals = [
        (plugin.fsdp_version != 2, FSDP1_REFUSAL),
        (
            bool(plugin.cpu_ram_efficient_loading),
            "cpu_ram_efficient_loading puts the model on the meta device on every process but the first, before the "
            "adapter is built and calibrated; set it to false",
        ),
        (
            bool(plugin.activation_checkpointing),
            "activation_checkpointing renames the layers the allocation methods address; use "
            "training.gradient_checkpointing: true instead",
        ),
        (
            "SHARDED" in str(plugin.state_dict_type),
            "state_dict_type SHARDED_STATE_DICT writes checkpoints without the adapter file --resume needs; use "
            "FULL_STATE_DICT",
        ),
    ]
    if model is not None:
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        refusals.append((bool(quantized), QUANTIZED_REFUSAL))
    for refused, reason in refusals:
        if refused:
            raise UserInputError(f"FSDP: {reason}")
    for name, module in model.named_modules() if model is not None else ():
        own = list(module.named_parameters(recurse=False))
        trained = any(parameter.requires_grad for _, parameter in own)
        frozen = [n for n, parameter in own if not parameter.requires_grad and not n.startswith("lora_")]
        if trained and frozen:  # e.g. a trained bias beside a frozen base weight: the weight would not be sharded
            raise UserInputError(
                f"FSDP: module {name} trains some of its parameters and not its {', '.join(frozen)}, which FSDP "
                "could then not shard (lora.bias: none keeps base biases frozen)"
            )


def layers_to_wrap(model: nn.Module) -> list[str]:
    """The model's `_no_split_modules` classes that it has, less those holding the input embedding: each becomes
    one FSDP unit. accelerate shards the input embedding as a unit of its own after the auto-wrap, and fails when
    the embedding already sits in a wrapped unit (BERT names `BertEmbeddings` among its `_no_split_modules`)."""
    names = getattr(model, "_no_split_modules", None) or []
    embedding = model.get_input_embeddings()
    holders = {type(module).__name__ for module in model.modules() if any(m is embedding for m in module.modules())}
    present = {type(module).__name__ for module in model.modules()}
    return [name for name in names if name in present and name not in holders]


class WholeAdapterUnderFSDP:
    """Trainer mixin: under FSDP2 the adapter's modules are left out of the shards and its gradients averaged by
    `AverageReplicatedGradients`. Put it before the Trainer class in the bases."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if not self.is_fsdp_enabled and self.args.fsdp:
            progress(
                "training.fsdp: accelerate shards models on GPUs and other accelerators only; this CPU run is plain "
                "data parallel (every process holds the whole model)"
            )

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._shard_base_only()
        return super().train(*args, **kwargs)

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        self._shard_base_only()  # an evaluation before training wraps the model too
        return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        self._shard_base_only()
        return super().predict(*args, **kwargs)

    def _shard_base_only(self) -> None:
        """Names the adapter's modules to FSDP before it wraps the model (at the first train, evaluate or predict;
        the drop-in trainers install their gated modules after the Trainer's constructor), and refuses the FSDP
        settings that cannot keep the adapter whole or that ranktune does not test.

        Raises:
            UserInputError: FSDP1, CPU-RAM-efficient loading, FSDP's activation checkpointing, sharded checkpoints,
                a quantized base, or a module that trains only some of its parameters.
        """
        if not self.is_fsdp_enabled:
            return
        plugin = self.accelerator.state.fsdp_plugin
        check_plugin(plugin, self.model)
        ignored = plugin.ignored_modules or []
        if isinstance(ignored, str):  # accelerate's pattern form, matched against module names as it does
            ignored = [module for name, module in self.model.named_modules() if re.fullmatch(ignored, name)]
        owners = adapter_modules(self.model)
        plugin.ignored_modules = [*ignored, *(module for module in owners if module not in ignored)]
        if plugin.transformer_cls_names_to_wrap is None:
            plugin.transformer_cls_names_to_wrap = layers_to_wrap(self.model)
        if not any(isinstance(c, AverageReplicatedGradients) for c in self.callback_handler.callbacks):
            self.add_callback(AverageReplicatedGradients(self.accelerator))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.is_fsdp_enabled:
            complete_adam_state(self.optimizer)
        super()._save_checkpoint(model, trial)
