"""`lora.init`: PEFT's initialisations pass through, and one that moves part of the base weights into the adapter
(PiSSA, OLoRA) is exported as an adapter that applies to the original base."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainingArguments

from ranktune import train
from ranktune.adapters.lora import build_lora_config
from ranktune.allocation.registry import BuildContext, build_adapter
from ranktune.config import validate_config
from ranktune.export import write_adapter
from tests.conftest import save_tiny_model
from tests.training.resume import _resume_from, over_two_epochs
from tests.training.test_run import text_config

INPUT_IDS = torch.tensor([[9, 20, 31, 42, 53, 64, 75, 86], [12, 14, 16, 18, 20, 22, 24, 26]])


def _config(model_dir, tmp_path, init: str, method: str = "none"):
    config = text_config(model_dir, tmp_path, max_steps=4, learning_rate=2e-2)
    config["lora"]["init"] = init
    config["allocation"] = {"method": method}
    return config


@pytest.mark.parametrize(
    ("init", "family"), [("pissa", "llama"), ("olora", "llama"), ("pissa", "bert")], ids=["pissa", "olora", "bert"]
)
def test_an_init_that_changes_the_base_exports_an_adapter_for_the_original_base(init, family, tmp_path):
    """Train the PiSSA / OLoRA model a few steps by hand (its base weights are the residual), export, and load the
    export with vanilla PEFT onto the untouched base: the logits must be the trained model's (a classifier's
    trained head included)."""
    classification = family == "bert"
    auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    model_dir = save_tiny_model(tmp_path / family, family, "classification" if classification else "causal_lm")
    raw = _config(model_dir, tmp_path, init)
    if classification:
        raw["model"]["task"] = "classification"
        raw["lora"]["target_modules"] = ["query", "value"]
    config = validate_config(raw)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    context = BuildContext(args, [], None, tmp_path / "out", seed=0)
    adapted = build_adapter(auto.from_pretrained(model_dir), config, context)
    model = adapted.model
    assert adapted.initial_adapter is not None
    labels = torch.tensor([0, 1]) if classification else INPUT_IDS
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=INPUT_IDS, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=INPUT_IDS).logits
    write_adapter(model, None, tmp_path / "adapter", initial_adapter=adapted.initial_adapter)

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["init_lora_weights"]) == (8, True)  # r 4 trained + r 4 initial, subtracted
    vanilla = PeftModel.from_pretrained(auto.from_pretrained(model_dir), str(tmp_path / "adapter"))
    with torch.no_grad():
        reloaded = vanilla.eval()(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)


def test_pissa_trains_end_to_end_and_the_adapter_counts_its_real_parameters(tmp_path):
    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    result = train(validate_config(_config(model_dir, tmp_path, "pissa")))
    tensors = load_file(str(result.output_dir / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert a.shape[0] == 8  # what a user loads is rank 2r
    ranks = {m["module"]: m["rank"] for m in json.loads((result.output_dir / "ranktune.json").read_text())["modules"]}
    assert set(ranks.values()) == {8}


def test_inits_map_to_peft_and_unknown_ones_are_refused():
    settings = validate_config(
        {"model": {"name_or_path": "m"}, "data": {"train": "t"}, "lora": {"init_lora_weights": "gaussian"}}
    ).lora
    assert build_lora_config(settings, "causal_lm").init_lora_weights == "gaussian"
    default = validate_config({"model": {"name_or_path": "m"}, "data": {"train": "t"}}).lora
    assert build_lora_config(default, "causal_lm").init_lora_weights is True
    assert validate_config(
        {"model": {"name_or_path": "m"}, "data": {"train": "t"}, "lora": {"init": "pissa_niter_4"}}
    ).lora.changes_base_weights()
    with pytest.raises(Exception, match="unknown initialisation 'loftq'"):
        validate_config({"model": {"name_or_path": "m"}, "data": {"train": "t"}, "lora": {"init": "loftq"}})


def test_a_method_that_sets_its_own_init_refuses_lora_init(tmp_path):
    with pytest.raises(Exception, match=re.escape("lora.init 'pissa' trains with allocation.method none, not 'l1ra'")):
        validate_config(_config(tmp_path, tmp_path, "pissa", method="l1ra"))


def test_a_resumed_pissa_run_ends_with_the_same_adapter(tmp_path):
    """The resumed run initialises PiSSA again from the same base (the same residual weights and initial adapter)
    before loading the checkpoint, so it exports the adapter the uninterrupted run did."""
    model_dir = save_tiny_model(tmp_path / "llama", "llama")
    whole = over_two_epochs(_config(model_dir, tmp_path, "pissa"))
    whole["training"].update(save_strategy="steps", save_steps=5, save_total_limit=None)
    resumed = copy.deepcopy(whole)
    resumed["output_dir"] = str(tmp_path / "resumed")
    train(validate_config(whole))
    train(validate_config(resumed))
    _resume_from(resumed, 10)
    expected = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ({"init": "pissa", "dora": True}, "cannot be converted for the original base with dora"),
        ({"init": "olora", "bias": "all"}, "cannot be converted for the original base with dora or a trained bias"),
        ({"init": "pissa", "rslora": True, "rank_pattern": {"q_proj": 8}}, "with rslora cannot be converted"),
        ({"init": "orthogonal", "r": 3}, "init 'orthogonal' needs even ranks; got 3"),
    ],
)
def test_inits_peft_would_refuse_late_are_refused_up_front(lora, message):
    with pytest.raises(Exception, match=re.escape(message)):
        validate_config({"model": {"name_or_path": "m"}, "data": {"train": "t"}, "lora": lora})
