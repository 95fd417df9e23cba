"""What LoRA adapts is checked against what was asked: ranks above a module's width, pattern keys that match nothing."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from ranktune.adapters.lora import attach_peft, build_lora_config, check_pattern_keys, lora_layers
from ranktune.config import LoraSettings
from ranktune.errors import UserInputError


@pytest.fixture
def llama(make_model_dir):
    """Hidden size 32; k_proj and v_proj map 32 → 16 (two key-value heads of 8)."""
    return AutoModelForCausalLM.from_pretrained(make_model_dir("llama"))


def test_rank_above_a_modules_width_warns_naming_it(llama, capsys):
    attach_peft(
        llama, build_lora_config(LoraSettings(r=20, target_modules=["q_proj", "k_proj", "v_proj"]), "causal_lm")
    )
    err = capsys.readouterr().err
    assert err.startswith("[ranktune] warning:") and err.count("\n") == 1
    assert "k_proj ×2 (r 20 > 16)" in err and "v_proj ×2 (r 20 > 16)" in err and "q_proj" not in err


def test_rank_within_every_width_is_silent(llama, capsys):
    attach_peft(llama, build_lora_config(LoraSettings(r=16, target_modules=["q_proj", "k_proj"]), "causal_lm"))
    assert capsys.readouterr().err == ""


@pytest.fixture
def adapted(llama) -> list[str]:
    model = attach_peft(llama, build_lora_config(LoraSettings(r=4, target_modules=["q_proj", "v_proj"]), "causal_lm"))
    return list(lora_layers(model))


def test_pattern_keys_match_like_peft(adapted):
    patterns = {"q_proj": 8, r"model\.layers\.1\.self_attn\.v_proj": 2, "layers.0.self_attn.v_proj": 2}
    check_pattern_keys(LoraSettings(rank_pattern=patterns, alpha_pattern={r".*_proj": 4.0}), adapted)


@pytest.mark.parametrize(
    ("field", "key", "close"),
    [("rank_pattern", "q_porj", "q_proj"), ("alpha_pattern", "self_attn.k_proj", "self_attn.q_proj")],
)
def test_pattern_key_matching_nothing_is_refused(adapted, field, key, close):
    settings = LoraSettings(**{field: {key: 2}})
    with pytest.raises(UserInputError) as caught:
        check_pattern_keys(settings, adapted)
    message = str(caught.value)
    assert f"lora.{field}: key '{key}' matches no adapted module" in message
    assert "Adapted module types: q_proj, v_proj" in message
    assert close in message.split("Close names: ")[1].split(". Adapted")[0].split(", ")


def test_invalid_pattern_key_is_refused(adapted):
    with pytest.raises(UserInputError, match=r"lora.rank_pattern: key 'q_proj\(' is not a valid regular expression"):
        check_pattern_keys(LoraSettings(rank_pattern={"q_proj(": 2}), adapted)
