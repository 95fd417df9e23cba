"""Loading an adapter folder (ours or any PEFT LoRA adapter) back onto its base model.

A HeteroLoRA adapter with shortcut connections carries them beside the PEFT files (shortcuts.json +
shortcuts.safetensors); they are installed after PEFT has loaded the LoRA part, so the model is the trained one.

An adapter folder is input someone may have handed you: nothing in it decides to run code. Custom model or tokenizer
code runs only when the caller passes `trust_remote_code=True` (the command line's `--trust-remote-code`), whatever
the folder's ranktune.json says; weights are read from safetensors files only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftModel
from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ranktune.adapters.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RUN_INFO, read_adapter_config, read_run_info
from ranktune.adapters.shortcut_files import load_shortcuts
from ranktune.config import ModelConfig, Task
from ranktune.errors import UserInputError
from ranktune.models.loading import (
    ModelNotFound,
    load_base_model,
    load_model_config,
    load_tokenizer,
    looks_local,
    saved_head_rows,
)

_PEFT_TASKS: dict[str, Task] = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "classification"}
# What a folder's ranktune.json may set about loading its base model; trust_remote_code is the caller's to give,
# and an attn_implementation naming a hub repository would fetch kernel code.
_RUN_MODEL_KEYS = ("dtype", "quantization", "revision", "attn_implementation")
_CODE_FILES = ("tokenizer_config.json", "config.json")
TRUST_ON_COMMAND_LINE = "rerun with --trust-remote-code (in Python: load_adapter(..., trust_remote_code=True))"


@dataclass
class LoadedAdapter:
    """A base model with the adapter applied, plus what eval and generate need to know about the run."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    task: Task
    label_names: list[str] | None
    adapter_dir: Path
    info: dict[str, Any] = field(default_factory=dict)


def _label_names(adapter_dir: Path, info: dict[str, Any]) -> list[str]:
    """The class names: ranktune.json's, else `0 … n-1` for the n rows of the saved head, which must exist (PEFT
    loads a classifier's head from the adapter) and agree with the names."""
    rows = saved_head_rows(adapter_dir)
    if rows is None:
        raise UserInputError(
            f"{adapter_dir}: a classification adapter without a saved classification head (no classifier or score "
            f"weights in {ADAPTER_WEIGHTS})"
        )
    names = info.get("label_names")
    if not names:
        return [str(i) for i in range(rows)]
    if rows != len(names):
        raise UserInputError(
            f"{adapter_dir}: {RUN_INFO} lists {len(names)} label names ({', '.join(map(str, names))}), but the "
            f"classification head saved in {ADAPTER_WEIGHTS} has {rows} rows (one per label); the files come from "
            "different runs"
        )
    return [str(name) for name in names]


def _declared_code(adapter_dir: Path) -> str | None:
    """The first `auto_map` entry (custom classes, a Python file in the folder or on the hub) the folder declares."""
    for name in _CODE_FILES:
        path = adapter_dir / name
        if not path.is_file():
            continue
        try:
            described = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserInputError(f"cannot read {path}: {error}") from None
        auto_map = described.get("auto_map") if isinstance(described, dict) else None
        if auto_map:
            return f"{name}: auto_map {json.dumps(auto_map)}"
    return None


def _model_config(adapter_dir: Path, info: dict[str, Any], base: str, task: Task, trust: bool) -> ModelConfig:
    """How to load the base model: the run's dtype, quantization, revision and attention, the caller's trust."""
    section = info.get("config", {}).get("model", {}) if isinstance(info.get("config"), dict) else {}
    settings = {key: section[key] for key in _RUN_MODEL_KEYS if isinstance(section, dict) and key in section}
    if "/" in str(settings.get("attn_implementation", "")):
        del settings["attn_implementation"]
    settings.update(name_or_path=base, task=task, trust_remote_code=trust)
    try:
        return ModelConfig.model_validate(settings)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise UserInputError(f"{adapter_dir / RUN_INFO}: config.model: {problems}") from None


def _base_not_found(adapter_dir: Path, base: str, detail: str) -> UserInputError:
    return UserInputError(
        f"the adapter's base model '{base}' (base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG}) cannot be "
        f"found{detail}: put the model back at that path, or set base_model_name_or_path to where it is now"
    )


def _load_weights(base_model: PreTrainedModel, adapter_dir: Path, base: str) -> PeftModel:
    """PEFT's loading of the adapter's weights onto the base model, a shape mismatch named as the input's fault."""
    try:
        return PeftModel.from_pretrained(base_model, adapter_dir)
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), "")
        raise UserInputError(
            f"{adapter_dir}: its weights do not fit the base model '{base}' ({detail.rstrip('.')}); is "
            f"base_model_name_or_path in {ADAPTER_CONFIG} the model the adapter was trained on?"
        ) from None


def load_adapter(adapter_dir: str | Path, quantize: bool = True, trust_remote_code: bool = False) -> LoadedAdapter:
    """Loads base model + adapter in eval mode.

    Args:
        adapter_dir: an adapter folder.
        quantize: False loads the base in full precision even if training used bitsandbytes (for merging).
        trust_remote_code: run custom model or tokenizer code that the folder or its base model ships; only the
            person running ranktune can allow it (the folder's own ranktune.json cannot).

    Raises:
        UserInputError: not an adapter folder, damaged files, a base model that cannot be found or loaded, custom
            code without `trust_remote_code`, or label counts that do not fit.
    """
    adapter_dir = Path(adapter_dir)
    adapter_config = read_adapter_config(adapter_dir)
    info = read_run_info(adapter_dir)
    task = _PEFT_TASKS.get(str(adapter_config.get("task_type")))
    if task is None:
        raise UserInputError(
            f"{adapter_dir}: task_type {adapter_config.get('task_type')!r} is not supported "
            f"(expected one of {', '.join(_PEFT_TASKS)})"
        )
    base = adapter_config.get("base_model_name_or_path") or info.get("base_model_path")
    if not base or not isinstance(base, str):
        raise UserInputError(f"{adapter_dir}: adapter_config.json has no base_model_name_or_path")
    where = f"the adapter's base model (base_model_name_or_path in {adapter_dir / ADAPTER_CONFIG})"
    if looks_local(base) and not Path(base).exists():
        raise _base_not_found(adapter_dir, base, "")
    model_config = _model_config(adapter_dir, info, base, task, trust_remote_code)
    declared = None if trust_remote_code else _declared_code(adapter_dir)
    if declared:
        raise UserInputError(
            f"'{adapter_dir}' declares Python code of its own ({declared}), which ranktune runs only when you ask: "
            f"{TRUST_ON_COMMAND_LINE} if you trust that code"
        )
    try:
        pretrained_config = load_model_config(base, model_config, where, TRUST_ON_COMMAND_LINE)
    except ModelNotFound as error:
        if Path(base).exists():
            raise
        raise _base_not_found(adapter_dir, base, f" (no such folder from here, and the hub: {error.reason})") from None
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(
        str(adapter_dir) if has_tokenizer else base,
        model_config,
        pretrained_config,
        where="the adapter's tokenizer" if has_tokenizer else where,
        trust_option=TRUST_ON_COMMAND_LINE,
    )
    label_names = _label_names(adapter_dir, info) if task == "classification" else None
    base_model = load_base_model(
        base,
        model_config,
        label_names=label_names,
        pad_token_id=tokenizer.pad_token_id,
        quantize=quantize,
        where=where,
        trust_option=TRUST_ON_COMMAND_LINE,
    )
    model = _load_weights(base_model, adapter_dir, base)
    load_shortcuts(model, adapter_dir)
    model.eval()
    return LoadedAdapter(model, tokenizer, task, label_names, adapter_dir, info)
