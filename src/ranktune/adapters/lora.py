"""Turning the `lora` config section into a PEFT LoRA model, and checking what it adapted against what was asked."""

from __future__ import annotations

import atexit
import difflib
import re
import shutil
import sys
import tempfile
from pathlib import Path

from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from ranktune.adapters.layout import module_types
from ranktune.config import LoraSettings, Task
from ranktune.errors import UserInputError
from ranktune.models.targets import matched_modules

TASK_TYPES = {"causal_lm": TaskType.CAUSAL_LM, "classification": TaskType.SEQ_CLS}
_PEFT_PREFIX = "base_model.model."


def build_lora_config(settings: LoraSettings, task: Task) -> LoraConfig:
    """Maps our keys onto `peft.LoraConfig`; PEFT adds the classification head to modules_to_save itself."""
    return LoraConfig(
        task_type=TASK_TYPES[task],
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        exclude_modules=settings.exclude_modules,
        use_rslora=settings.rslora,
        use_dora=settings.dora,
        init_lora_weights=True if settings.init == "default" else settings.init,
        bias=settings.bias,
        rank_pattern=dict(settings.rank_pattern),
        alpha_pattern=dict(settings.alpha_pattern),
        modules_to_save=settings.modules_to_save,
    )


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The adapted modules of a PEFT model, by their name in the bare model (`model.layers.0.self_attn.q_proj`)."""
    return {
        name.removeprefix(_PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and module.r
    }


def warn_rank_above_width(model: PeftModel) -> None:
    """One `[ranktune] warning:` line on stderr naming the modules whose rank exceeds min(in, out).

    A rank-r update of an (out × in) weight has rank at most min(in, out): the extra components add parameters and
    compute but no capacity. Training still works, so this warns rather than refuses.
    """
    adapter = model.active_adapter
    layers = lora_layers(model)
    types = module_types(layers)
    groups: dict[tuple[str, int, int], int] = {}
    for name, layer in layers.items():
        r, width = layer.r.get(adapter, 0), min(layer.in_features, layer.out_features)
        if r > width:
            key = (types[name], r, width)
            groups[key] = groups.get(key, 0) + 1
    if not groups:
        return
    listed = ", ".join(f"{kind} ×{count} (r {r} > {width})" for (kind, r, width), count in sorted(groups.items()))
    print(
        f"[ranktune] warning: the rank of {sum(groups.values())} adapted modules is above their width min(in, out), "
        f"where it adds parameters but no capacity: {listed}; lower lora.r or set those modules' rank in "
        "lora.rank_pattern",
        file=sys.stderr,
    )


def _matches(key: str, name: str) -> bool:
    """PEFT's own test (`peft.utils.other.get_pattern_key`): the key matches the end of the module name."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def check_pattern_keys(settings: LoraSettings, adapted: list[str]) -> None:
    """Refuses a `rank_pattern` / `alpha_pattern` key that matches no adapted module (PEFT ignores it silently).

    Args:
        settings: the `lora` section as the user wrote it (before a plan or per-module settings rewrote the keys).
        adapted: the adapted modules' names in the bare model.

    Raises:
        UserInputError: a key is not a valid regular expression or matches none of `adapted`; the message names
            the closest module names and the adapted module types.
    """
    suffixes = {".".join(name.split(".")[-k:]) for name in adapted for k in range(1, name.count(".") + 2)}
    for field, pattern in (("rank_pattern", settings.rank_pattern), ("alpha_pattern", settings.alpha_pattern)):
        for key in pattern:
            try:
                matched = any(_matches(key, name) for name in adapted)
            except re.error as error:
                raise UserInputError(f"lora.{field}: key '{key}' is not a valid regular expression ({error})") from None
            if matched:
                continue
            close = difflib.get_close_matches(key, sorted(suffixes), n=3, cutoff=0.6)
            hint = f" Close names: {', '.join(close)}." if close else ""
            kinds = ", ".join(sorted(set(module_types(adapted).values())))
            raise UserInputError(
                f"lora.{field}: key '{key}' matches no adapted module (a key matches the end of a module name, or "
                f"is a regular expression for it).{hint} Adapted module types: {kinds}"
            )


def save_initial_adapter(model: PeftModel) -> Path:
    """Saves the adapter as it is now (before training) into a temporary folder removed when the process exits, and
    returns it: PEFT's `path_initial_model_for_weight_conversion` for an init that changes the base weights."""
    folder = Path(tempfile.mkdtemp(prefix="ranktune-initial-adapter-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.save_pretrained(str(folder))
    return folder


def attach_peft(model: PreTrainedModel, peft_config: LoraConfig, gradient_checkpointing: bool = False) -> PeftModel:
    """Wraps `model` with a LoRA-family adapter (LoRA, AdaLoRA) after checking that the target modules exist, and
    warns about ranks above a module's width.

    Raises:
        UserInputError: `target_modules` matches nothing (the message lists what exists).
    """
    matched_modules(model, peft_config)
    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    peft_model = get_peft_model(model, peft_config)
    warn_rank_above_width(peft_model)
    return peft_model
