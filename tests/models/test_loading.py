"""Tokenizer and model loading: the EOS token a causal LM needs, and custom code only when the user allows it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ranktune.config import ModelConfig
from ranktune.errors import UserInputError
from ranktune.models import load_tokenizer


def _edit_json(path: Path, remove: tuple[str, ...] = (), **changes: object) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in remove:
        data.pop(key)
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def llama_without_eos(make_model_dir) -> Path:
    """A tiny llama whose tokenizer has no EOS token (its config still names eos_token_id 3, `</s>`)."""
    folder = make_model_dir("llama")
    _edit_json(folder / "tokenizer_config.json", remove=("eos_token",))
    return folder


def _causal(folder: Path) -> ModelConfig:
    return ModelConfig(name_or_path=str(folder), task="causal_lm")


def test_missing_eos_comes_from_the_model_config(llama_without_eos, capsys):
    tokenizer = load_tokenizer(str(llama_without_eos), _causal(llama_without_eos))
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == 3
    assert tokenizer.pad_token == "<pad>"
    assert "[ranktune] the tokenizer has no EOS token; using '</s>'" in capsys.readouterr().err


def test_missing_eos_falls_back_to_the_sep_token(llama_without_eos):
    _edit_json(llama_without_eos / "config.json", eos_token_id=None)
    _edit_json(llama_without_eos / "tokenizer_config.json", sep_token="<|end|>")
    tokenizer = load_tokenizer(str(llama_without_eos), _causal(llama_without_eos))
    assert tokenizer.eos_token == "<|end|>"


def test_causal_lm_without_any_eos_is_refused_with_how_to_set_one(llama_without_eos):
    _edit_json(llama_without_eos / "config.json", eos_token_id=None)
    with pytest.raises(UserInputError, match=r"no EOS token.*\"eos_token\".*tokenizer_config\.json"):
        load_tokenizer(str(llama_without_eos), _causal(llama_without_eos))


def test_model_with_custom_code_is_refused_naming_the_config_key(make_model_dir, tmp_path):
    folder = make_model_dir("llama")
    marker = tmp_path / "code-ran"
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    _edit_json(folder / "config.json", model_type="evil-llama", auto_map=auto_map)
    for module in ("configuration_evil", "modeling_evil"):
        (folder / f"{module}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    with pytest.raises(UserInputError, match=r"needs Python code of its own.*set model\.trust_remote_code: true"):
        load_tokenizer(str(folder), _causal(folder))
    assert not marker.exists()


@pytest.mark.parametrize("data_format", ["text", "prompt_completion"])
def test_causal_lm_without_eos_trains_end_to_end(llama_without_eos, tmp_path, data_format):
    """The two crashes reported: NaN in text blocks, a TypeError on prompt/completion rows, both at the first batch."""
    from ranktune.config import validate_config
    from ranktune.training import train

    rows = [{"text": f"line {i} of the corpus"} for i in range(16)]
    if data_format == "prompt_completion":
        rows = [{"prompt": f"say {i}", "completion": f" {i} {i}"} for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = {
        "model": {"name_or_path": str(llama_without_eos)},
        "data": {"train": str(data), "max_length": 16, "format": data_format},
        "lora": {"r": 2, "target_modules": ["q_proj"]},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no"},
        "output_dir": str(tmp_path / "out"),
    }
    result = train(validate_config(config))
    assert math.isfinite(result.metrics["train_loss"])
    saved = json.loads((result.output_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert saved["eos_token"] == "</s>"
