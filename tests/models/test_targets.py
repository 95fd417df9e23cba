"""Target-module matching mirrors PEFT's, and a miss lists what exists."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from ranktune.errors import UserInputError
from ranktune.models import adaptable_modules, matched_modules


@pytest.fixture
def llama(make_model_dir):
    return AutoModelForCausalLM.from_pretrained(make_model_dir("llama"))


def test_explicit_names_match_every_layer(llama):
    names = matched_modules(llama, LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert names == [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def test_regex_matches_like_peft(llama):
    names = matched_modules(llama, LoraConfig(target_modules=r".*\.1\.mlp\.(up|down)_proj"))
    assert names == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_no_match_lists_existing_linear_names(llama):
    with pytest.raises(UserInputError) as caught:
        matched_modules(llama, LoraConfig(target_modules=["query", "value"]))
    message = str(caught.value)
    assert "matches no linear module" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message


def test_gpt2_conv1d_counts_as_linear(make_model_dir):
    model = AutoModelForCausalLM.from_pretrained(make_model_dir("gpt2"))
    assert "transformer.h.0.attn.c_attn" in adaptable_modules(model)
