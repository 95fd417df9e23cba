"""Export of gated modules: vanilla PEFT loads it and reproduces ranktune's logits (fp32, 1e-5)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ranktune.allocation.components import install_gates
from ranktune.export import write_adapter

CASES = {"llama": "causal_lm", "gpt2": "causal_lm", "bert": "classification"}


def load(folder, task):
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return auto.from_pretrained(folder).eval()


@pytest.mark.parametrize("family", CASES)
def test_exported_adapter_reproduces_gated_model_in_plain_peft(family, make_model_dir, tokenizer, tmp_path):
    task = CASES[family]
    folder = make_model_dir(family, task)
    torch.manual_seed(0)
    task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
    model = get_peft_model(
        load(folder, task), LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules="all-linear")
    )
    modules = install_gates(model, capacity=6)
    with torch.no_grad():
        for i, module in enumerate(modules):
            module.lora_B.weight.normal_(std=0.3)
            module.lora_A.lora_gate.uniform_(0.2, 1.0)
            module.lora_A.lora_mask[:] = False
            module.lora_A.lora_mask[torch.arange(i % 4, 6, 2)] = True  # a different, non-prefix subset per module
            module.lora_A.refresh()
        modules[0].lora_A.lora_mask[:] = False  # one module pruned to rank 0: it must be left out
        modules[0].lora_A.refresh()
    model.eval()
    ids = torch.tensor([tokenizer("a few words to score").input_ids])
    with torch.no_grad():
        ours = model(ids).logits

    write_adapter(model, tokenizer, tmp_path / "out", factors={m.name: m.folded() for m in modules})
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    expected = {m.name: m.rank for m in modules if m.rank}
    assert config["rank_pattern"] == expected == config["alpha_pattern"]
    assert config["r"] == config["lora_alpha"] == max(expected.values()) and config["use_rslora"] is False
    assert sorted(config["target_modules"]) == sorted(expected) and modules[0].name not in config["target_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns about rank_pattern keys that match nothing
        reloaded = PeftModel.from_pretrained(load(folder, task), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours, rtol=0, atol=1e-5)
