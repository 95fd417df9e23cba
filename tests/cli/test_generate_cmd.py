"""`ranktune generate` passes the model only the tokenizer outputs its forward takes."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from ranktune.cli.generate_cmd import model_inputs
from tests.cli.helpers import run_cli


def _peft(folder):
    return get_peft_model(AutoModelForCausalLM.from_pretrained(folder), LoraConfig(r=2, task_type="CAUSAL_LM"))


ENCODED = {"input_ids": torch.ones(1, 3), "token_type_ids": torch.zeros(1, 3), "attention_mask": torch.ones(1, 3)}


@pytest.mark.parametrize(("family", "kept"), [("llama", False), ("gpt2", True)])
def test_token_type_ids_only_for_models_that_take_them(make_model_dir, family, kept):
    inputs = model_inputs(ENCODED, _peft(make_model_dir(family)))
    assert ("token_type_ids" in inputs) is kept
    assert {"input_ids", "attention_mask"} <= set(inputs)


def test_generate_with_a_tokenizer_that_returns_token_type_ids(make_model_dir, tmp_path):
    """A BERT-style tokenizer on a causal LM: generate used to stop on the unused token_type_ids (exit 1)."""
    base, adapter = make_model_dir("llama"), tmp_path / "adapter"
    _peft(base).save_pretrained(adapter)
    for name in ("tokenizer.json", "chat_template.jinja"):
        (adapter / name).write_bytes((base / name).read_bytes())
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    (adapter / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    result = run_cli("generate", str(adapter), "--prompt", "hi", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
