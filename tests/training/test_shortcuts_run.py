"""Training with shortcut connections: plain, under HeteroLoRA's three shortcut modes, resumed, and the commands
that read the adapter (eval, generate, inspect, merge)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ranktune.config import validate_config
from ranktune.errors import UserInputError
from ranktune.training import train
from tests.cli.helpers import assert_clean_error, run_cli
from tests.training.resume import assert_resume_is_exact, over_two_epochs
from tests.training.test_hetero_run import TARGETS, hetero_config, reallocations

SHORTCUTS = {"r": 2, "alpha": 4}
CONNECTIONS = 7  # four kinds in each of 2 layers, no shortcut2 in layer 0


def test_plain_lora_with_shortcuts_trains_saves_and_serves(make_model_dir, tmp_path):
    model_dir = make_model_dir("llama")
    config = hetero_config(model_dir, tmp_path)
    config["allocation"] = {"method": "none"}
    config["shortcuts"] = SHORTCUTS
    out = train(validate_config(config)).output_dir

    described = json.loads((out / "shortcuts.json").read_text())
    assert len(described["connections"]) == CONNECTIONS
    tensors = load_file(str(out / "shortcuts.safetensors"))
    assert all(tensors[f"{name}.B"].abs().sum() > 0 for name in described["connections"])  # trained from zero
    info = json.loads((out / "ranktune.json").read_text())
    lora = 2 * 4 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + (64 + 32))  # q, k, v (2 KV heads: 16 out), o, down
    assert info["trainable_parameters"] == lora + CONNECTIONS * 2 * (32 + 32)  # each connection: A (2, 32), B (32, 2)

    shown = run_cli("inspect", str(out))
    assert shown.returncode == 0, shown.stderr
    assert "model.layers.1.shortcut2" in shown.stdout and f"total: {10 + CONNECTIONS} modules" in shown.stdout
    evaluated = run_cli("eval", str(out), "--data", config["data"]["train"], "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert math.isfinite(json.loads(evaluated.stdout)["loss"])
    generated = run_cli("generate", str(out), "--prompt", "the", "--max-new-tokens", "4")
    assert generated.returncode == 0, generated.stderr
    merged = run_cli("merge", str(out), "--out", str(tmp_path / "merged"))
    assert_clean_error(merged, 2, "shortcut connections", "cannot be merged", "ranktune eval")
    assert not (tmp_path / "merged").exists()


# keep 0.3 of 10 LoRA modules and 7 connections: floor(3.0) LoRA slots and round(2.1) shortcut slots; `off` keeps
# every connection on.
SLOTS = {"combined": (3, 2), "separated": (3, 2), "off": (3, 7)}


@pytest.mark.parametrize("mode", ["combined", "separated", "off"])
def test_each_shortcuts_mode_enables_what_it_promises(mode, make_model_dir, tmp_path):
    config = hetero_config(make_model_dir("llama"), tmp_path, shortcuts_mode=mode)
    config["shortcuts"] = SHORTCUTS
    out = train(validate_config(config)).output_dir
    lora_slots, shortcut_slots = SLOTS[mode]
    assert len(TARGETS) * 2 == 10
    steps = reallocations(out)
    assert sorted(steps) == [0, 4, 8]
    for rows in steps.values():
        shortcuts = {n: r for n, r in rows.items() if n.rsplit(".", 1)[-1].startswith(("residual", "shortcut"))}
        lora = {n: r for n, r in rows.items() if n not in shortcuts}
        assert len(lora) == 10 and len(shortcuts) == CONNECTIONS
        on_lora = sum(r["enabled"] for r in lora.values())
        on_shortcuts = sum(r["enabled"] for r in shortcuts.values())
        if mode == "combined":  # one pool: the top lora_slots + shortcut_slots of all, by raw score
            assert on_lora + on_shortcuts == lora_slots + shortcut_slots
            kept = [r["score"] for r in rows.values() if r["enabled"]]
            assert min(kept) >= max(r["score"] for r in rows.values() if not r["enabled"])
        else:
            assert (on_lora, on_shortcuts) == (lora_slots, shortcut_slots)
    final = {n for n, r in steps[8].items() if r["enabled"]}
    exported = set(json.loads((out / "shortcuts.json").read_text())["connections"])
    assert exported == {n for n in final if n.rsplit(".", 1)[-1].startswith(("residual", "shortcut"))}


def test_a_resumed_shortcut_search_ends_exactly_like_an_uninterrupted_one(make_model_dir, tmp_path):
    model_dir = make_model_dir("llama")
    straight, checkpointed = (hetero_config(model_dir, tmp_path / name, shortcuts_mode="separated") for name in "ab")
    for config in (straight, checkpointed):
        config["shortcuts"] = {**SHORTCUTS, "dropout": 0.1}
        over_two_epochs(config)
    reference = assert_resume_is_exact(straight, checkpointed, save_steps=6, resume_steps=[12, 6])
    assert (reference / "shortcuts.safetensors").is_file()  # two connections enabled at the end: compared above
    saved = load_file(str(tmp_path / "b" / "out" / "checkpoint-6" / "shortcuts.safetensors"))
    assert len(saved) == 2 * CONNECTIONS  # checkpoints keep the disabled connections too


def test_shortcut_misconfigurations_get_one_clear_message(make_model_dir, tmp_path):
    config = hetero_config(make_model_dir("llama"), tmp_path, shortcuts_mode="separated", keep=0.05)
    config["shortcuts"] = SHORTCUTS
    with pytest.raises(UserInputError, match=r"allocation.keep 0.05 of 10 LoRA modules enables none"):
        train(validate_config(config))
    config["allocation"] = {"method": "l1ra"}
    with pytest.raises(UserInputError, match=r"shortcuts train with allocation\.method none or hetero"):
        validate_config(config)
    config["allocation"] = {"method": "none"}
    config["training"].update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(UserInputError, match="use_reentrant: true cannot train shortcut connections"):
        train(validate_config(config))
    plan = tmp_path / "plan.yaml"
    plan.write_text("format: ranktune-plan-1\nmodules:\n  model.layers.0.self_attn.q_proj: {enabled: true, rank: 4}\n"
                    "  model.layers.1.residual1: {enabled: true, rank: 2}\n")  # fmt: skip
    del config["shortcuts"]
    config["training"] = {"max_steps": 1}
    config["lora"]["plan"] = str(plan)
    with pytest.raises(UserInputError, match="enables shortcut connections, but the config has no `shortcuts`"):
        train(validate_config(config))


def test_shortcuts_under_gradient_checkpointing_get_the_same_gradients(make_model_dir, tmp_path):
    """shortcut2 reads the previous layer's activations: checkpointing must not cut that gradient path."""
    from ranktune.allocation.registry import BuildContext, build_adapter
    from ranktune.training.arguments import build_training_arguments
    from ranktune.training.run import prepare_run

    grads = []
    for checkpointing in (False, True):
        config = hetero_config(make_model_dir("llama"), tmp_path, method="none")
        config["allocation"] = {"method": "none"}
        config["shortcuts"] = SHORTCUTS
        config["training"]["gradient_checkpointing"] = checkpointing
        run = validate_config(config)
        prepared = prepare_run(run)
        args = build_training_arguments(run, tmp_path / "out", has_validation=False)
        context = BuildContext(args, prepared.datasets["train"], None, tmp_path / "out", seed=0)
        model = build_adapter(prepared.model, run, context).model
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        model.train()
        torch.manual_seed(0)
        for name, parameter in model.named_parameters():
            if "ranktune_shortcuts" in name and name.endswith(".B"):
                torch.nn.init.normal_(parameter)
        ids = torch.tensor([[5, 9, 12, 20, 7, 8]])
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if "ranktune_shortcuts" in n})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * CONNECTIONS
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


def test_layer_wise_settings_and_the_reference_toml_reach_the_trained_adapter(make_model_dir, tmp_path):
    """YAML per-module settings for LoRA and a reference-format shortcut TOML, through a real training run."""
    (tmp_path / "shortcuts.toml").write_text(
        'granularity = "layer"\n'
        "[default]\nr = 2\nshortcut_alpha = 4\nproj_dropout = 0.0\ndisable_projector = true\n"
        "[model_layer_1.shortcut2]\nr = 3\nshortcut_alpha = 6\ndisable_projector = false\n"
    )
    config = hetero_config(make_model_dir("llama"), tmp_path)
    config["allocation"] = {"method": "none"}
    config["lora"] = {"r": 4, "target_modules": ["q_proj"], "modules": {"w2": {"r": 2}},
                      "layers": {1: {"q_proj": {"enabled": False}}}}  # fmt: skip
    config["shortcuts"] = {"reference_config": str(tmp_path / "shortcuts.toml")}
    out = train(validate_config(config)).output_dir
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (2, 64)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    saved = json.loads((out / "shortcuts.json").read_text())["connections"]
    assert saved == {
        "model.layers.1.shortcut2": {"layer": 1, "kind": "shortcut2", "r": 3, "alpha": 6.0, "dropout": 0.0}
    }
