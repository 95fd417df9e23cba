"""Writing a finished adapter into output_dir in vanilla PEFT format, never half-written.

Plain LoRA is saved by PEFT itself. Adaptive-rank runs (L1RA's gated modules, AdaLoRA's SVD layers) are exported in
the canonical heterogeneous form: each strategy folds its gates and scaling into the weights and drops inactive
components, rank-0 modules are left out, and `r = lora_alpha = max rank` with
`rank_pattern = alpha_pattern = {module: rank}`, so every scaling is exactly 1.0 and any PEFT-reading tool loads it.

PEFT recognises an adapter folder by its adapter_config.json. The whole adapter is staged in a hidden folder first;
only then is an earlier adapter's config removed and the new files moved in, the config last. A failure while
staging leaves the earlier adapter untouched, and a crash while moving leaves no adapter_config.json and nothing
that looks finished.

Shortcut connections, which PEFT cannot express, go beside the adapter (shortcuts.safetensors + shortcuts.json,
`adapters/shortcut_files.py`), staged with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from ranktune.adapters.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SHORTCUTS_CONFIG, SHORTCUTS_WEIGHTS
from ranktune.adapters.shortcut_files import write_shortcuts
from ranktune.adapters.shortcuts import ShortcutSet
from ranktune.allocation.strategy import FoldedFactors
from ranktune.errors import RuntimeFailure
from ranktune.files import STAGING_PREFIX
from ranktune.serving.forms import canonical_config


def canonical_adapter(model: PeftModel, factors: FoldedFactors) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and adapter_config of the vanilla LoRA adapter holding the given folded factors.

    Every LoRA tensor of the adapted modules (gates, masks, AdaLoRA's E included) is replaced by the folded A and B;
    other saved tensors (modules_to_save, such as a classification head) are kept as PEFT saved them.

    Returns:
        (tensors keyed as PEFT saves them, the adapter_config dict).

    Raises:
        RuntimeFailure: every module ended with rank 0.
    """
    tensors = get_peft_model_state_dict(model)
    prefixes = tuple(f"base_model.model.{name}.lora_" for name in factors)
    tensors = {key: value for key, value in tensors.items() if not key.startswith(prefixes)}
    ranks: dict[str, int] = {}
    for name, folded in factors.items():
        if folded is None:
            continue
        lora_a, lora_b = folded  # (k, in), (out, k)
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b
        ranks[name] = int(lora_a.shape[0])
    if not ranks:
        raise RuntimeFailure("every adapted module was pruned to rank 0; there is no adapter to write")
    return tensors, canonical_config(model.peft_config["default"].to_dict(), ranks)


def _save_canonical(model: PeftModel, factors: FoldedFactors, folder: Path) -> None:
    tensors, config = canonical_adapter(model, factors)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, default=_jsonable) + "\n", encoding="utf-8")


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else str(value)


_LORA_FACTOR = re.compile(r"\.lora_[AB]\.")


def _save_converted(model: PeftModel, initial_adapter: Path, staging: Path) -> None:
    """PEFT's conversion of a PiSSA / OLoRA adapter for the original base (the trained factors minus the initial
    ones, rank 2r), with the tensors the conversion leaves out (a classifier head, other modules_to_save) put back."""
    model.save_pretrained(
        staging, path_initial_model_for_weight_conversion=str(initial_adapter), save_embedding_layers=False
    )
    converted = load_file(str(staging / ADAPTER_WEIGHTS))
    whole = get_peft_model_state_dict(model)
    kept = {key: value for key, value in whole.items() if key not in converted and not _LORA_FACTOR.search(key)}
    if kept:
        save_file({**converted, **{k: v.detach().contiguous() for k, v in kept.items()}},
                  str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})  # fmt: skip


def write_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase | None,
    output_dir: str | Path,
    factors: FoldedFactors | None = None,
    sidecars: Callable[[Path], dict[str, Any]] | None = None,
    shortcuts: ShortcutSet | None = None,
    initial_adapter: Path | None = None,
) -> None:
    """Saves adapter_config.json + adapter_model.safetensors (+ tokenizer) into output_dir, config last.

    Args:
        model: the trained PeftModel.
        tokenizer: saved beside the adapter (when given).
        output_dir: the run's output folder.
        factors: an adaptive-rank run's folded factors (`AllocationStrategy.folded_factors()`), exported in the
            canonical vanilla form; None saves the plain LoRA model as PEFT does.
        sidecars: given the staged adapter folder, returns {file name: JSON payload} to write beside it (for
            example ranktune.json), so they are in place before the adapter looks finished.
        shortcuts: the model's shortcut connections; the enabled ones are written beside the adapter.
        initial_adapter: the adapter at step 0 of an init that changed the base weights (PiSSA, OLoRA); PEFT then
            saves the difference as a LoRA adapter of twice the rank that applies to the original base.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}adapter-", dir=output_dir))
    try:
        if factors is not None:
            _save_canonical(model, factors, staging)
        elif initial_adapter is not None:
            _save_converted(model, initial_adapter, staging)
        else:
            model.save_pretrained(staging, save_embedding_layers=False)  # ranktune never resizes the vocabulary
        if shortcuts is not None and any(c.enabled for _, c in shortcuts.named_connections()):
            write_shortcuts(shortcuts, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, payload in (sidecars(staging) if sidecars else {}).items():
            (staging / name).write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        for stale in (ADAPTER_CONFIG, SHORTCUTS_CONFIG, SHORTCUTS_WEIGHTS):  # an earlier adapter, replaced now
            (output_dir / stale).unlink(missing_ok=True)
        files = sorted(staging.iterdir(), key=lambda p: p.name == ADAPTER_CONFIG)
        for path in files:
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
