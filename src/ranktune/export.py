"""Writing a finished adapter into output_dir in vanilla PEFT format, never half-written.

PEFT recognises an adapter folder by its adapter_config.json, so that file is moved in last, after the weights and
the tokenizer; a crash before then leaves no adapter_config.json and nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from ranktune.adapters.layout import ADAPTER_CONFIG


def write_adapter(model: PeftModel, tokenizer: PreTrainedTokenizerBase, output_dir: str | Path) -> None:
    """Saves adapter_config.json + adapter_model.safetensors (+ tokenizer) into output_dir, config last."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / ADAPTER_CONFIG).unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=output_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = sorted(staging.iterdir(), key=lambda p: p.name == ADAPTER_CONFIG)
        for path in files:
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Writes JSON to a temporary file beside `path`, then renames it over `path`."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(payload, stream, indent=2, default=str)
        stream.write("\n")
    os.replace(temporary, path)
