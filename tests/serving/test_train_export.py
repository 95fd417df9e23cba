"""Serving forms written at the end of `ranktune train` (`export: {formats, max_rank}`)."""

from __future__ import annotations

import gguf
import pytest
import torch

from ranktune.config import validate_config
from ranktune.errors import UserInputError
from ranktune.training import train
from tests.conftest import save_tiny_model
from tests.serving.helpers import logits
from tests.training.test_run import text_config


def test_training_writes_the_serving_forms_and_a_later_run_replaces_them(tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    config = text_config(model_dir, tmp_path, max_steps=2)
    config["lora"] = {"r": 4, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}}
    config["export"] = {"formats": ["uniform", "gguf"]}
    out = train(validate_config(config)).output_dir
    serving = out / "serving"
    assert sorted(p.name for p in serving.iterdir()) == ["adapter.gguf", "uniform"]
    torch.testing.assert_close(logits(model_dir, serving / "uniform"), logits(model_dir, out), rtol=0, atol=1e-5)
    assert len(gguf.GGUFReader(str(serving / "adapter.gguf")).tensors) == 8  # 4 modules, A and B
    config["export"] = {"formats": []}
    train(validate_config(config), overwrite=True)
    assert not serving.exists()  # the forms of the earlier adapter are gone with it


def test_gguf_is_refused_before_training_for_an_unknown_layout_and_for_a_classifier(tmp_path):
    gpt2 = save_tiny_model(tmp_path / "gpt2", "gpt2")
    config = text_config(gpt2, tmp_path, max_steps=2)
    config["lora"] = {"r": 2, "target_modules": ["c_attn"]}
    config["export"] = {"formats": ["gguf"]}
    with pytest.raises(UserInputError, match="gguf knows the LlamaForCausalLM layout, and the base model is GPT2"):
        train(validate_config(config))
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    config["model"]["task"] = "classification"
    with pytest.raises(UserInputError, match=r"gguf is a llama\.cpp adapter, for causal LMs only"):
        validate_config(config)


def test_a_serving_form_that_fails_after_training_keeps_the_finished_run(tmp_path, monkeypatch):
    """The adapter is written before the forms: a form that cannot be made is logged, and the run, its adapter and
    its logs stay; an earlier run's forms are gone (they belonged to the earlier adapter)."""
    from ranktune.serving import export

    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    config = text_config(model_dir, tmp_path, max_steps=2)
    config["export"] = {"formats": ["uniform"]}
    out = train(validate_config(config)).output_dir
    assert (out / "serving" / "uniform").is_dir()

    def refuse(*args, **kwargs):
        raise UserInputError("no room for the uniform form")

    monkeypatch.setattr(export, "export_adapter", refuse)
    result = train(validate_config(config), overwrite=True)
    assert result.info and (out / "adapter_config.json").is_file() and (out / "metrics.jsonl").is_file()
    assert not (out / "serving").exists() and not (out / ".previous-run").exists()
