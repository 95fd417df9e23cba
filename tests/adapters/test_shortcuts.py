"""Shortcut connections: exactness when zero or disabled, where each term lands, saving and loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPTNeoXConfig

from ranktune.adapters.layout import SHORTCUTS_CONFIG, SHORTCUTS_WEIGHTS, read_shortcut_ranks
from ranktune.adapters.loading import load_adapter
from ranktune.adapters.shortcut_types import ShortcutSpec
from ranktune.adapters.shortcuts import find_shortcuts, install_shortcuts
from ranktune.config import SHORTCUT_KINDS
from ranktune.errors import UserInputError
from ranktune.export import write_adapter
from tests.conftest import build_config, build_tokenizer

VARIANTS = ("llama", "gpt2", "opt", "opt-post-ln", "bert")
SPEC = ShortcutSpec(r=4, alpha=8.0, dropout=0.0)


def tiny_model(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    family = variant.split("-")[0]
    config = build_config(family, len(tokenizer), tokenizer)
    if variant == "opt-post-ln":
        config.do_layer_norm_before = False  # OPT-350m's layout: LayerNorm after each residual add
    auto = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    return auto.from_config(config).eval()


def every_connection(layers: int = 2) -> dict[tuple[int, str], ShortcutSpec]:
    return {(i, kind): SPEC for i in range(layers) for kind in SHORTCUT_KINDS if (i, kind) != (0, "shortcut2")}


def input_ids() -> torch.Tensor:
    return torch.randint(7, 60, (2, 11), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=input_ids()).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_initialised_or_disabled_connections_compute_the_base_function_bit_for_bit(variant: str) -> None:
    model = tiny_model(variant)
    base = logits(model)
    shortcuts = install_shortcuts(model, every_connection())
    assert len(list(shortcuts.named_connections())) == 7  # four kinds in two layers, no shortcut2 in layer 0
    assert torch.equal(logits(model), base)  # B = 0 at start
    for _, connection in shortcuts.named_connections():
        torch.nn.init.normal_(connection.B)
    trained = logits(model)
    assert (trained - base).abs().max() > 1e-3  # the connections do act once B has moved
    for _, connection in shortcuts.named_connections():
        connection.enabled = False
    assert torch.equal(logits(model), base)


def _capture(module: torch.nn.Module, store: dict[str, torch.Tensor], key: str, inputs: bool = False):
    def hook(mod, args, output):
        value = args[0] if inputs else output
        store[key] = (value[0] if isinstance(value, tuple) else value).detach().clone()

    return module.register_forward_hook(hook)


@pytest.mark.parametrize("variant", ["llama", "gpt2", "opt"])
def test_shortcut1_adds_the_low_rank_map_of_the_layer_input_to_the_layer_output(variant: str) -> None:
    """In a pre-LN layer, shortcut1 (layer input → FFN output) shifts the layer's output by exactly s·B·A·x_i."""
    model = tiny_model(variant)
    layers = model.base_model.get_submodule({"llama": "layers", "gpt2": "h", "opt": "decoder.layers"}[variant])
    last = layers[-1]
    seen: dict[str, torch.Tensor] = {}
    handles = [_capture(last, seen, "x", inputs=True), _capture(last, seen, "base_out")]
    logits(model)
    for handle in handles:
        handle.remove()
    shortcuts = install_shortcuts(model, {(len(layers) - 1, "shortcut1"): SPEC})
    connection = shortcuts.connections[str(len(layers) - 1)]["shortcut1"]
    torch.nn.init.normal_(connection.B)
    handle = _capture(last, seen, "out")
    logits(model)
    handle.remove()
    scale = SPEC.alpha / SPEC.r
    expected = seen["base_out"] + scale * seen["x"] @ connection.A.detach().T @ connection.B.detach().T
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


def test_shortcut2_carries_the_previous_layers_ffn_input_to_this_layers_attention_output() -> None:
    model = tiny_model("llama")
    first, second = model.model.layers
    seen: dict[str, torch.Tensor] = {}
    handles = [
        _capture(first.post_attention_layernorm, seen, "h0", inputs=True),
        _capture(second.self_attn, seen, "base_attention"),
    ]
    logits(model)
    for handle in handles:
        handle.remove()
    shortcuts = install_shortcuts(model, {(1, "shortcut2"): SPEC})
    connection = shortcuts.connections["1"]["shortcut2"]
    torch.nn.init.normal_(connection.B)
    handle = _capture(second.self_attn, seen, "attention")  # registered after ours: sees the sum
    logits(model)
    handle.remove()
    expected = seen["base_attention"] + 2.0 * seen["h0"] @ connection.A.detach().T @ connection.B.detach().T
    torch.testing.assert_close(seen["attention"], expected, rtol=1e-5, atol=1e-5)


def test_an_unsupported_architecture_gets_a_clear_error() -> None:
    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserInputError, match=r"model type 'gpt_neox'.*supported model types: .*llama.*opt"):
        install_shortcuts(model, {(0, "residual1"): SPEC})


def _lora_with_shortcuts(model_dir: Path) -> PeftModel:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    shortcuts = install_shortcuts(model, every_connection())
    with torch.no_grad():
        for _, connection in shortcuts.named_connections():
            connection.B.normal_(0.0, 0.5)
    return model.eval()


def test_save_then_load_restores_the_adapted_model(make_model_dir, tmp_path: Path) -> None:
    model_dir = make_model_dir("llama")
    model = _lora_with_shortcuts(model_dir)
    shortcuts = find_shortcuts(model)
    disabled = "model.layers.1.shortcut1"
    dict(shortcuts.named_connections())[disabled].enabled = False
    expected = logits(model)
    out = tmp_path / "adapter"
    write_adapter(model, build_tokenizer(), out, shortcuts=shortcuts)

    described = json.loads((out / SHORTCUTS_CONFIG).read_text())
    assert described["layers"] == "model.layers" and described["hidden_size"] == 32
    assert disabled not in described["connections"]  # a disabled connection contributes nothing: not exported
    assert len(described["connections"]) == 6
    assert {m.module_type for m in read_shortcut_ranks(out)} == set(SHORTCUT_KINDS)

    loaded = load_adapter(out)
    torch.testing.assert_close(logits(loaded.model), expected, rtol=0, atol=1e-6)

    # Vanilla PEFT reads the LoRA part alone: the same model with every connection switched off.
    for _, connection in shortcuts.named_connections():
        connection.enabled = False
    lora_only = logits(model)
    vanilla = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    torch.testing.assert_close(logits(vanilla), lora_only, rtol=0, atol=1e-6)


def test_loading_refuses_shortcuts_saved_for_another_model(make_model_dir, tmp_path: Path) -> None:
    model = _lora_with_shortcuts(make_model_dir("llama"))
    out = tmp_path / "adapter"
    write_adapter(model, None, out, shortcuts=find_shortcuts(model))
    described = json.loads((out / SHORTCUTS_CONFIG).read_text())
    described["hidden_size"] = 64
    (out / SHORTCUTS_CONFIG).write_text(json.dumps(described))
    with pytest.raises(UserInputError, match="hidden size 64"):
        load_adapter(out)
    assert (out / SHORTCUTS_WEIGHTS).is_file()
