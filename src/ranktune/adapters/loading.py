"""Loading an adapter folder (ours or any PEFT LoRA adapter) back onto its base model.

A HeteroLoRA adapter with shortcut connections carries them beside the PEFT files (shortcuts.json +
shortcuts.safetensors); they are installed after PEFT has loaded the LoRA part, so the model is the trained one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from ranktune.adapters.layout import ADAPTER_WEIGHTS, read_adapter_config, read_run_info
from ranktune.adapters.shortcut_files import load_shortcuts
from ranktune.config import ModelConfig, Task
from ranktune.errors import UserInputError
from ranktune.models.loading import load_base_model, load_tokenizer

_PEFT_TASKS: dict[str, Task] = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "classification"}
_HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


@dataclass
class LoadedAdapter:
    """A base model with the adapter applied, plus what eval and generate need to know about the run."""

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    task: Task
    label_names: list[str] | None
    adapter_dir: Path
    info: dict[str, Any] = field(default_factory=dict)


def _head_label_count(adapter_dir: Path) -> int | None:
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
            if key.endswith(_HEAD_SUFFIXES):
                return tensors.get_slice(key).get_shape()[0]
    return None


def _label_names(adapter_dir: Path, info: dict[str, Any]) -> list[str]:
    if info.get("label_names"):
        return list(info["label_names"])
    count = _head_label_count(adapter_dir)
    if count is None:
        raise UserInputError(f"{adapter_dir}: a classification adapter without a saved classification head")
    return [str(i) for i in range(count)]


def load_adapter(adapter_dir: str | Path, quantize: bool = True) -> LoadedAdapter:
    """Loads base model + adapter in eval mode.

    Args:
        adapter_dir: an adapter folder.
        quantize: False loads the base in full precision even if training used bitsandbytes (for merging).

    Raises:
        UserInputError: not an adapter folder, or its base model cannot be loaded.
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
    if not base:
        raise UserInputError(f"{adapter_dir}: adapter_config.json has no base_model_name_or_path")
    model_section = dict(info.get("config", {}).get("model", {}))
    model_section.update(name_or_path=base, task=task)
    model_config = ModelConfig.model_validate(model_section)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(adapter_dir) if has_tokenizer else base, model_config)
    label_names = _label_names(adapter_dir, info) if task == "classification" else None
    base_model = load_base_model(
        base, model_config, label_names=label_names, pad_token_id=tokenizer.pad_token_id, quantize=quantize
    )
    model = PeftModel.from_pretrained(base_model, adapter_dir)
    load_shortcuts(model, adapter_dir)
    model.eval()
    return LoadedAdapter(model, tokenizer, task, label_names, adapter_dir, info)
