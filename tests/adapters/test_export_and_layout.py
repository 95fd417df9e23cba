"""The written adapter is vanilla PEFT, its per-module ranks read back right, and a failed write leaves nothing."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ranktune.adapters.layout import module_types, read_module_ranks
from ranktune.adapters.lora import attach_peft, build_lora_config
from ranktune.config import LoraSettings
from ranktune.export import write_adapter
from ranktune.reports import module_grid


@pytest.fixture
def adapted(make_model_dir):
    folder = make_model_dir("llama")
    model = AutoModelForCausalLM.from_pretrained(folder)
    settings = LoraSettings(
        r=4, target_modules=["q_proj", "down_proj"], rank_pattern={"model.layers.1.mlp.down_proj": 2}
    )
    peft_model = attach_peft(model, build_lora_config(settings, "causal_lm"))
    with torch.no_grad():  # make B non-zero so the adapter changes the output
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return folder, peft_model


def test_written_adapter_loads_in_plain_peft_with_same_logits(adapted, tokenizer, tmp_path):
    folder, peft_model = adapted
    write_adapter(peft_model, tokenizer, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(folder)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "out").eval()
    ids = torch.tensor([tokenizer("some text").input_ids])
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, peft_model(ids).logits, rtol=0, atol=1e-6)
        base_logits = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    assert not torch.allclose(base_logits, reloaded(ids).logits)


def test_lora_on_the_embedding_exports_its_factors_without_the_base_embedding(make_model_dir, tokenizer, tmp_path):
    """PEFT's default would copy the base model's whole input embedding into the adapter when LoRA targets it."""
    folder = make_model_dir("llama")
    settings = LoraSettings(r=2, target_modules=["q_proj", "embed_tokens"])
    peft_model = attach_peft(AutoModelForCausalLM.from_pretrained(folder), build_lora_config(settings, "causal_lm"))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                parameter.normal_(std=0.5)
    write_adapter(peft_model, tokenizer, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert not [key for key in saved if "base_layer" in key or key.endswith("embed_tokens.weight")]
    assert sum("lora_embedding_A" in key for key in saved) == 1
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "out").eval()
    ids = torch.tensor([tokenizer("some text").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, peft_model.eval()(ids).logits, rtol=0, atol=1e-6)


def test_module_ranks_read_from_tensors(adapted, tokenizer, tmp_path):
    _, peft_model = adapted
    write_adapter(peft_model, tokenizer, tmp_path / "out")
    ranks = {m.module: m for m in read_module_ranks(tmp_path / "out")}
    assert sorted(ranks) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    down = ranks["model.layers.1.mlp.down_proj"]
    assert (down.layer, down.module_type, down.rank) == (1, "down_proj", 2)
    assert down.parameters == 2 * (64 + 32)  # r * (in_features + out_features) of a 64 -> 32 projection
    assert ranks["model.layers.0.self_attn.q_proj"].rank == 4


def test_failed_write_leaves_no_adapter(adapted, tokenizer, tmp_path, monkeypatch):
    _, peft_model = adapted

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        write_adapter(peft_model, tokenizer, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_module_types_are_short_and_distinct():
    llama = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    assert set(module_types(llama).values()) == {"q_proj", "down_proj"}
    bert = ["bert.pooler.dense"] + [
        f"bert.encoder.layer.{i}.{m}"
        for i in range(2)
        for m in ("attention.self.query", "attention.output.dense", "intermediate.dense", "output.dense")
    ]
    types = module_types(bert)
    assert types["bert.encoder.layer.1.attention.output.dense"] == "attention.output.dense"
    assert types["bert.encoder.layer.1.output.dense"] == "output.dense"
    assert types["bert.encoder.layer.0.intermediate.dense"] == "intermediate.dense"
    assert types["bert.encoder.layer.0.attention.self.query"] == "query"
    assert types["bert.pooler.dense"] == "pooler.dense"
    layers, columns, grid = module_grid({name: float(i) for i, name in enumerate(bert)})
    assert layers == [0, 1] and columns == ["attention.output.dense", "intermediate.dense", "output.dense", "query"]
    assert grid[1, 0] == bert.index("bert.encoder.layer.1.attention.output.dense")  # the pooler has no row
