"""Per-module LoRA and shortcut settings end up on the wrapped model exactly as configured."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel

from ranktune.adapters.lora import build_lora_config
from ranktune.adapters.shortcut_types import ShortcutSpec
from ranktune.config import LoraSettings, ShortcutSettings
from ranktune.errors import UserInputError
from ranktune.models.module_settings import (
    apply_module_dropouts,
    resolve_lora_settings,
    resolve_shortcut_specs,
)
from ranktune.reference_toml import read_reference_toml
from tests.conftest import build_config, build_tokenizer

LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny(family: str) -> PreTrainedModel:
    tokenizer = build_tokenizer()
    config = build_config(family, len(tokenizer), tokenizer)
    return AutoModel.from_config(config) if family == "bert" else AutoModelForCausalLM.from_config(config)


def wrap(model: PreTrainedModel, settings: LoraSettings) -> dict[str, tuple[int, float, float]]:
    """Resolves, wraps with PEFT, applies the dropouts; returns {module: (rank, scaling, dropout p)} as built."""
    resolved, dropouts = resolve_lora_settings(model, settings)
    peft_model = get_peft_model(model, build_lora_config(resolved, "causal_lm"))
    apply_module_dropouts(peft_model, dropouts)
    built = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            dropout = module.lora_dropout["default"]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            built[name.removeprefix("base_model.model.")] = (
                module.lora_A["default"].weight.shape[0],
                module.scaling["default"],
                p,
            )
    return built


def llama_name(layer: int, path: str) -> str:
    return f"model.layers.{layer}.{path}"


def expected(entries: dict[str, tuple[int, float, float]]) -> dict[str, tuple[int, float, float]]:
    """{module: (r, alpha, dropout)} → {module: (r, alpha / r, dropout)}, the scaling computed by hand."""
    return {name: (r, pytest.approx(alpha / r), pytest.approx(p)) for name, (r, alpha, p) in entries.items()}


def write(tmp_path: Path, text: str, name: str = "reference.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_settings_without_tables_come_back_unchanged():
    settings = LoraSettings(target_modules=["q_proj"])
    assert resolve_lora_settings(tiny("llama"), settings) == (settings, {})


def test_network_wise_settings_apply_to_every_layer():
    settings = LoraSettings.model_validate(
        {
            "r": 8,
            "alpha": 16,
            "dropout": 0.1,
            "target_modules": ["q_proj", "v_proj"],
            "modules": {"v_proj": {"r": 4, "alpha": 8}, "w1": {"r": 2}, "q_proj": {"enabled": False}},
        }
    )
    built = wrap(tiny("llama"), settings)
    assert built == expected(
        {
            **{llama_name(i, "self_attn.v_proj"): (4, 8, 0.1) for i in range(2)},
            **{llama_name(i, "mlp.up_proj"): (2, 16, 0.1) for i in range(2)},
        }
    )


def test_layer_wise_settings_apply_over_network_wise():
    settings = LoraSettings.model_validate(
        {
            "r": 8,
            "alpha": 16,
            "dropout": 0.1,
            "target_modules": ["q_proj", "v_proj"],
            "modules": {"q_proj": {"r": 4}},
            "layers": {
                1: {"q_proj": {"r": 2, "dropout": 0.3}, "v_proj": {"enabled": False}},
                0: {"self_attn.k_proj": {"alpha": 4, "dropout": 0.0}},
            },
        }
    )
    built = wrap(tiny("llama"), settings)
    assert built == expected(
        {
            llama_name(0, "self_attn.q_proj"): (4, 16, 0.1),
            llama_name(0, "self_attn.k_proj"): (8, 4, 0.0),
            llama_name(0, "self_attn.v_proj"): (8, 16, 0.1),
            llama_name(1, "self_attn.q_proj"): (2, 16, 0.3),
        }
    )


def test_resolved_settings_are_plain_peft_fields():
    settings = LoraSettings.model_validate(
        {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj"], "layers": {1: {"q_proj": {"r": 2}}}}
    )
    resolved, dropouts = resolve_lora_settings(tiny("llama"), settings)
    assert resolved.target_modules == [llama_name(0, "self_attn.q_proj"), llama_name(1, "self_attn.q_proj")]
    assert resolved.rank_pattern == {llama_name(1, "self_attn.q_proj"): 2}
    assert resolved.alpha_pattern == {}
    assert (resolved.modules, resolved.layers, resolved.reference_config, resolved.exclude_modules) == (
        {},
        {},
        None,
        None,
    )
    assert dropouts == {}


def test_peft_takes_the_first_matching_pattern_key():
    """Why user pattern entries are folded into full names: an earlier short key shadows a later full name."""
    model = tiny("llama")
    rank_pattern = {"q_proj": 4, llama_name(0, "self_attn.q_proj"): 2}
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=8, rank_pattern=rank_pattern))
    ranks = [
        peft_model.get_submodule(f"base_model.model.{llama_name(i, 'self_attn.q_proj')}").r["default"] for i in (0, 1)
    ]
    assert ranks == [4, 4]


def test_user_patterns_keep_working_and_overrides_win():
    settings = LoraSettings.model_validate(
        {
            "r": 8,
            "alpha": 16,
            "dropout": 0.0,
            "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"q_proj": 4, r".*\.1\.self_attn\.v_proj": 6},
            "alpha_pattern": {"v_proj": 32},
            "layers": {0: {"q_proj": {"r": 2}}, 1: {"v_proj": {"alpha": 3}}},
        }
    )
    built = wrap(tiny("llama"), settings)
    assert built == expected(
        {
            llama_name(0, "self_attn.q_proj"): (2, 16, 0.0),
            llama_name(1, "self_attn.q_proj"): (4, 16, 0.0),
            llama_name(0, "self_attn.v_proj"): (8, 32, 0.0),
            llama_name(1, "self_attn.v_proj"): (6, 3, 0.0),
        }
    )


def test_rslora_scales_by_alpha_over_sqrt_r():
    settings = LoraSettings.model_validate(
        {"r": 8, "alpha": 16, "rslora": True, "target_modules": ["q_proj"], "modules": {"q_proj": {"r": 4, "alpha": 6}}}
    )
    built = wrap(tiny("llama"), settings)
    assert {name: scaling for name, (_, scaling, _) in built.items()} == {
        llama_name(i, "self_attn.q_proj"): pytest.approx(6 / math.sqrt(4)) for i in range(2)
    }


def test_all_linear_means_the_linear_modules_inside_the_layers():
    settings = LoraSettings.model_validate(
        {"r": 4, "alpha": 8, "dropout": 0.0, "exclude_modules": ["k_proj"], "modules": {"gate": {"enabled": False}}}
    )
    built = wrap(tiny("llama"), settings)
    paths = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    assert built == expected({llama_name(i, path): (4, 8, 0.0) for i in range(2) for path in paths})


def test_module_dropout_zero_becomes_identity():
    settings = LoraSettings.model_validate(
        {"dropout": 0.2, "target_modules": ["q_proj"], "layers": {1: {"q_proj": {"dropout": 0.0}}}}
    )
    model = tiny("llama")
    resolved, dropouts = resolve_lora_settings(model, settings)
    peft_model = get_peft_model(model, build_lora_config(resolved, "causal_lm"))
    apply_module_dropouts(peft_model, dropouts)
    layers = [peft_model.get_submodule(f"base_model.model.{llama_name(i, 'self_attn.q_proj')}") for i in (0, 1)]
    assert isinstance(layers[0].lora_dropout["default"], nn.Dropout)
    assert layers[0].lora_dropout["default"].p == pytest.approx(0.2)
    assert isinstance(layers[1].lora_dropout["default"], nn.Identity)


def test_gpt2_names_the_fused_projection_and_abstract_ones():
    settings = LoraSettings.model_validate(
        {"r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["c_fc"], "modules": {"c_attn": {"r": 2}, "o_proj": {}}}
    )
    built = wrap(tiny("gpt2"), settings)
    assert built == expected(
        {
            **{f"transformer.h.{i}.attn.c_attn": (2, 8, 0.0) for i in range(2)},
            **{f"transformer.h.{i}.attn.c_proj": (8, 8, 0.0) for i in range(2)},
            **{f"transformer.h.{i}.mlp.c_fc": (8, 8, 0.0) for i in range(2)},
        }
    )


def test_bert_names_by_last_component_or_path():
    settings = LoraSettings.model_validate(
        {"target_modules": ["key"], "modules": {"query": {"r": 2}, "attention.output.dense": {"r": 3}}}
    )
    resolved, _ = resolve_lora_settings(tiny("bert"), settings)
    assert resolved.target_modules == sorted(
        f"encoder.layer.{i}.{path}"
        for i in range(2)
        for path in ("attention.self.query", "attention.self.key", "attention.output.dense")
    )
    assert resolved.rank_pattern == {
        **{f"encoder.layer.{i}.attention.self.query": 2 for i in range(2)},
        **{f"encoder.layer.{i}.attention.output.dense": 3 for i in range(2)},
    }


LLAMA_NETWORK_TOML = """
granularity = "network"

[default]
r = 8
lora_alpha = 16
lora_dropout = 0.1
adapter_name = "default"
disable_adapter = false
importance_beta = 0.5

[all_layers.q_proj]
r = 4
lora_alpha = 8
lora_dropout = 0.2

[all_layers.w1]
r = 0

[all_layers.gate]
disable_adapter = true
"""


def test_reference_lora_network_llama(tmp_path):
    settings = LoraSettings(reference_config=write(tmp_path, LLAMA_NETWORK_TOML))
    built = wrap(tiny("llama"), settings)
    rest = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")
    assert built == expected(
        {
            **{llama_name(i, "self_attn.q_proj"): (4, 8, 0.2) for i in range(2)},
            **{llama_name(i, path): (8, 16, 0.1) for i in range(2) for path in rest},
        }
    )


def test_reference_lora_layer_llama(tmp_path):
    text = """
granularity = "layer"

[default]
r = 8
lora_alpha = 16
lora_dropout = 0.0
disable_adapter = true

[model_layer_0.q_proj]
disable_adapter = false

[model_layer_1.v_proj]
r = 2
lora_alpha = 4
disable_adapter = false

[model_layer_1.q_proj]
r = 4
"""
    built = wrap(tiny("llama"), LoraSettings(reference_config=write(tmp_path, text)))
    assert built == expected(
        {llama_name(0, "self_attn.q_proj"): (8, 16, 0.0), llama_name(1, "self_attn.v_proj"): (2, 4, 0.0)}
    )


def test_reference_lora_network_opt(tmp_path):
    text = """
granularity = "network"

[default]
r = 8
lora_alpha = 8
lora_dropout = 0.0
disable_adapter = false

[all_layers.o_proj]
r = 4

[all_layers.w1]
r = 2
lora_alpha = 6

[all_layers.w2]
disable_adapter = true
"""
    built = wrap(tiny("opt"), LoraSettings(reference_config=write(tmp_path, text)))
    layer = "model.decoder.layers.{}.{}"
    assert built == expected(
        {
            **{
                layer.format(i, f"self_attn.{p}"): (8, 8, 0.0) for i in range(2) for p in ("q_proj", "k_proj", "v_proj")
            },
            **{layer.format(i, "self_attn.out_proj"): (4, 8, 0.0) for i in range(2)},
            **{layer.format(i, "fc1"): (2, 6, 0.0) for i in range(2)},
        }
    )


def test_reference_lora_layer_opt(tmp_path):
    text = """
granularity = "layer"

[default]
r = 0
lora_alpha = 16
lora_dropout = 0.05

[model_layer_1.w2]
r = 6

[model_layer_0.o_proj]
r = 2
lora_dropout = 0.1
"""
    built = wrap(tiny("opt"), LoraSettings(reference_config=write(tmp_path, text)))
    assert built == expected(
        {"model.decoder.layers.1.fc2": (6, 16, 0.05), "model.decoder.layers.0.self_attn.out_proj": (2, 16, 0.1)}
    )


SHORTCUT_NETWORK_TOML = """
granularity = "network"

[default]
r = 3
shortcut_alpha = 5
proj_dropout = 0.0
projector_name = "test"
disable_projector = false

[all_layers.residual1]
r = 6
shortcut_alpha = 10

[all_layers.shortcut2]
r = 9
"""


def test_reference_shortcuts_network(tmp_path):
    settings = ShortcutSettings(reference_config=write(tmp_path, SHORTCUT_NETWORK_TOML))
    specs = resolve_shortcut_specs(tiny("llama"), settings)
    assert list(specs.items()) == [
        ((0, "residual1"), ShortcutSpec(6, 10, 0.0)),
        ((0, "residual2"), ShortcutSpec(3, 5, 0.0)),
        ((0, "shortcut1"), ShortcutSpec(3, 5, 0.0)),
        ((1, "residual1"), ShortcutSpec(6, 10, 0.0)),
        ((1, "residual2"), ShortcutSpec(3, 5, 0.0)),
        ((1, "shortcut1"), ShortcutSpec(3, 5, 0.0)),
        ((1, "shortcut2"), ShortcutSpec(9, 5, 0.0)),
    ]


def test_reference_shortcuts_layer(tmp_path):
    text = """
granularity = "layer"

[default]
r = 3
shortcut_alpha = 5
proj_dropout = 0.1
disable_projector = true

[model_layer_0.residual1]
r = 2
disable_projector = false

[model_layer_0.shortcut2]
disable_projector = false

[model_layer_1.shortcut2]
shortcut_alpha = 1
disable_projector = false

[model_layer_1.residual2]
r = 0
disable_projector = false
"""
    specs = resolve_shortcut_specs(tiny("opt"), ShortcutSettings(reference_config=write(tmp_path, text)))
    assert specs == {(0, "residual1"): ShortcutSpec(2, 5, 0.1), (1, "shortcut2"): ShortcutSpec(3, 1, 0.1)}


def test_shortcut_yaml_tables():
    settings = ShortcutSettings.model_validate(
        {
            "kinds": ["residual1"],
            "r": 4,
            "alpha": 2,
            "modules": {"shortcut1": {"r": 2}},
            "layers": {1: {"residual1": {"enabled": False}, "shortcut2": {"alpha": 1, "dropout": 0.1}}},
        }
    )
    specs = resolve_shortcut_specs(tiny("gpt2"), settings)
    assert list(specs.items()) == [
        ((0, "residual1"), ShortcutSpec(4, 2, 0.0)),
        ((0, "shortcut1"), ShortcutSpec(2, 2, 0.0)),
        ((1, "shortcut1"), ShortcutSpec(2, 2, 0.0)),
        ((1, "shortcut2"), ShortcutSpec(4, 1, 0.1)),
    ]


def test_read_reference_toml_uses_our_field_names(tmp_path):
    values = read_reference_toml(write(tmp_path, SHORTCUT_NETWORK_TOML), "shortcuts")
    assert {key: values[key] for key in ("r", "alpha", "dropout", "default_enabled", "layers")} == {
        "r": 3,
        "alpha": 5,
        "dropout": 0.0,
        "default_enabled": True,
        "layers": {},
    }
    assert values["modules"]["residual1"].model_dump() == {"r": 6, "alpha": 10, "dropout": 0.0, "enabled": True}
    updated = ShortcutSettings().model_copy(update={k: v for k, v in values.items() if k != "default_enabled"})
    assert (updated.r, updated.alpha, updated.modules["shortcut2"].r) == (3, 5, 9)


@pytest.mark.parametrize(
    ("family", "settings", "fragments"),
    [
        (
            "llama",
            {"modules": {"qproj": {"r": 2}}},
            ["unknown module 'qproj'", "q_proj", "self_attn.q_proj", "up_proj"],
        ),
        ("gpt2", {"modules": {"q_proj": {"r": 2}}}, ["no q_proj projection", "fuses q, k and v", "attn.c_attn"]),
        ("gpt2", {"modules": {"c_proj": {"r": 2}}}, ["'c_proj' is ambiguous", "attn.c_proj", "mlp.c_proj"]),
        ("llama", {"layers": {2: {"q_proj": {"r": 2}}}}, ["lora.layers.2", "layer 2 does not exist", "0 to 1"]),
        ("llama", {"modules": {"gate": {"enabled": False}}, "target_modules": ["gate_proj"]}, ["every LoRA module"]),
    ],
)
def test_lora_name_errors(family, settings, fragments):
    with pytest.raises(UserInputError) as caught:
        resolve_lora_settings(tiny(family), LoraSettings.model_validate(settings))
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_shortcut_layer_out_of_range():
    settings = ShortcutSettings.model_validate({"layers": {5: {"residual1": {"r": 2}}}})
    with pytest.raises(UserInputError, match=r"shortcuts\.layers\.5: layer 5 does not exist"):
        resolve_shortcut_specs(tiny("llama"), settings)


def test_reference_config_with_explicit_settings(tmp_path):
    path = write(tmp_path, LLAMA_NETWORK_TOML)
    with pytest.raises(UserInputError, match=r"lora\.reference_config and lora\.r both set"):
        resolve_lora_settings(tiny("llama"), LoraSettings.model_validate({"reference_config": path, "lora_r": 4}))
    with pytest.raises(UserInputError, match="use one or the other"):
        resolve_shortcut_specs(tiny("llama"), ShortcutSettings(reference_config=path, kinds=["residual1"]))


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            'granularity = "network"\n[default]\nr = 8\nlora_rank = 4\n',
            ["unknown field 'lora_rank' in [default]", "r, lora_alpha, lora_dropout, disable_adapter"],
        ),
        (
            'granularity = "network"\n[default]\nr = 8\n[model_layer_3.q_proj]\nr = 2\n',
            ["[model_layer_3]", 'granularity = "network"', "[all_layers.<module>]"],
        ),
        (
            'granularity = "layer"\n[default]\nr = 8\n[all_layers.q_proj]\nr = 2\n',
            ["[all_layers]", "[model_layer_<i>.<module>]"],
        ),
        ('granularity = "model"\n[default]\nr = 8\n', ['"network" or "layer"', "'model'"]),
        ('granularity = "network"\n[all_layers.q_proj]\nr = 2\n', ["[default] table is required"]),
        ('granularity = "network"\n[default]\nr = "eight"\n', ["[default] r must be a whole number"]),
        ('granularity = "network"\n[default]\nlora_alpha = 0\n', ["[default] lora_alpha", "greater than 0"]),
        ('granularity = "network"\n[default]\nr = 8\n[all_layers.q_proj]\nalpha = 2\n', ["[all_layers.q_proj]"]),
        ("granularity = \n", ["is not valid TOML"]),
    ],
)
def test_reference_lora_toml_errors(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(UserInputError) as caught:
        read_reference_toml(path, "lora")
    message = str(caught.value)
    assert path in message
    for fragment in fragments:
        assert fragment in message


def test_reference_shortcut_toml_errors(tmp_path):
    path = write(tmp_path, 'granularity = "network"\n[default]\nr = 3\n[all_layers.residual3]\nr = 2\n')
    with pytest.raises(UserInputError, match=r"unknown shortcut kind in \[all_layers.residual3\].*residual1"):
        read_reference_toml(path, "shortcuts")
    with pytest.raises(UserInputError, match="cannot read reference config"):
        read_reference_toml(tmp_path / "missing.toml", "shortcuts")


def test_reference_lora_unknown_module_names_the_file(tmp_path):
    path = write(tmp_path, 'granularity = "network"\n[default]\nr = 8\n[all_layers.query]\nr = 2\n')
    with pytest.raises(UserInputError, match=r"\[all_layers\]: unknown module 'query'"):
        resolve_lora_settings(tiny("llama"), LoraSettings(reference_config=path))
