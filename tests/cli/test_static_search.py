"""HeteroLoRA's static search through the console script: saliency → plan → train with lora.plan."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from tests.cli.helpers import assert_clean_error, run_cli
from tests.cli.test_train_cmd import WORDS, write_config


def test_saliency_plan_and_training_with_the_plan(make_model_dir, tmp_path):
    rows = [{"text": f"{w} and {v} again {w}"} for w in WORDS for v in WORDS]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(
        tmp_path,
        f"""
        model: {{name_or_path: {make_model_dir("llama")}}}
        data: {{train: {tmp_path / "text.jsonl"}, max_length: 32}}
        lora: {{r: 4, target_modules: all-linear}}
        training: {{max_steps: 3, per_device_train_batch_size: 4, save_strategy: "no"}}
        output_dir: {tmp_path / "out"}
        """,
    )
    scoring = ["saliency", str(config), "--heuristic", "synflow", "--batches", "2", "--out", "s.json"]
    scored = run_cli(*scoring, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    scores = json.loads((tmp_path / "s.json").read_text())
    modules = scores["modules"]
    assert scores["heuristic"] == "synflow" and scores["batches"] == 2 and len(modules) == 14  # 2 layers x 7
    values = [entry["score"] for entry in modules.values()]
    assert values == sorted(values, reverse=True) and values[-1] > 0  # informative at B = 0, sorted
    assert scored.stdout.splitlines()[1].split()[-1] == next(iter(modules))  # the table starts with the best

    planned = run_cli("plan", "s.json", "--keep", "0.25", "--redistribute", "--out", "plan.yaml", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())["modules"]
    kept = {name: entry["rank"] for name, entry in plan.items() if entry["enabled"]}
    assert len(kept) == 3 == int(0.25 * 14) and set(kept) == set(list(modules)[:3])
    cost = {name: entry["in_features"] + entry["out_features"] for name, entry in modules.items()}
    assert sum(rank * cost[name] for name, rank in kept.items()) <= 4 * sum(cost[name] for name in kept)

    trained = run_cli("train", str(config), f"lora.plan={tmp_path / 'plan.yaml'}")
    assert trained.returncode == 0, trained.stderr
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(kept) and adapter["rank_pattern"] == kept
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    adapted = {key.split(".lora_A")[0].removeprefix("base_model.model.") for key in tensors if "lora_A" in key}
    assert adapted == set(kept)


def test_plan_refuses_a_file_that_is_not_scores(tmp_path):
    (tmp_path / "other.json").write_text('{"modules": {}}')
    result = run_cli("plan", str(tmp_path / "other.json"), "--out", str(tmp_path / "plan.yaml"))
    assert_clean_error(result, 2, "is not a `ranktune saliency` output")
    assert not (tmp_path / "plan.yaml").exists()


def test_training_refuses_a_plan_that_enables_nothing(tmp_path):
    (tmp_path / "plan.yaml").write_text("format: ranktune-plan-1\nmodules: {a.q_proj: {enabled: false, rank: 0}}\n")
    config = write_config(tmp_path, f"model: {{name_or_path: x}}\ndata: {{train: x}}\noutput_dir: {tmp_path / 'o'}\n")
    result = run_cli("train", str(config), f"lora.plan={tmp_path / 'plan.yaml'}")
    assert_clean_error(result, 2, "enables no module")


def test_static_search_over_lora_modules_and_shortcut_connections(make_model_dir, tmp_path):
    """grad_norm scores both kinds of candidate; `--shortcuts-mode separated` keeps the top quarter of each; the run
    installs exactly the planned connections and saves them beside the adapter."""
    rows = [{"text": f"{w} and {v} again {w}"} for w in WORDS for v in WORDS]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(
        tmp_path,
        f"""
        model: {{name_or_path: {make_model_dir("gpt2")}}}
        data: {{train: {tmp_path / "text.jsonl"}, max_length: 32}}
        lora: {{r: 4, target_modules: [c_attn, c_fc]}}
        shortcuts: {{r: 2, kinds: [residual1, shortcut1, shortcut2]}}
        training: {{max_steps: 3, per_device_train_batch_size: 4, save_strategy: "no"}}
        output_dir: {tmp_path / "out"}
        """,
    )
    scored = run_cli("saliency", str(config), "--heuristic", "grad_norm", "--batches", "2", "--out", "s.json",
                     cwd=tmp_path)  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    modules = json.loads((tmp_path / "s.json").read_text())["modules"]
    connections = {name for name in modules if name.rsplit(".", 1)[-1] in ("residual1", "shortcut1", "shortcut2")}
    assert len(modules) == 4 + 5 and len(connections) == 5  # c_attn, c_fc x 2 layers; 3 kinds x 2 - shortcut2 at 0
    assert all(modules[name]["rank"] == 2 and modules[name]["in_features"] == 32 for name in connections)

    planned = run_cli("plan", "s.json", "--keep", "0.5", "--shortcuts-mode", "separated", "--out", "plan.yaml",
                      cwd=tmp_path)  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())["modules"]
    kept = {name for name, entry in plan.items() if entry["enabled"]}
    kept_connections = kept & connections
    assert len(kept - connections) == 2 and len(kept_connections) == round(0.5 * 5)
    best = sorted(connections, key=lambda n: -modules[n]["score"])[: len(kept_connections)]
    assert kept_connections == set(best)

    trained = run_cli("train", str(config), f"lora.plan={tmp_path / 'plan.yaml'}")
    assert trained.returncode == 0, trained.stderr
    saved = json.loads((tmp_path / "out" / "shortcuts.json").read_text())["connections"]
    assert set(saved) == kept_connections
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(kept - connections)


def test_plan_writes_the_ranks_as_peft_lora_config_fields(make_model_dir, tmp_path):
    """--peft-out: plain LoraConfig fields that put exactly the kept modules at their planned ranks, each at the
    pool's scale alpha / r, and leave shortcut connections (which PEFT cannot express) out."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    names = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    modules = {name: {"score": float(8 - n), "in_features": 32, "out_features": 32} for n, name in enumerate(names)}
    modules["model.layers.1.residual1"] = {"score": 100.0, "rank": 2, "in_features": 32, "out_features": 32}
    scores = {"format": "ranktune-saliency-1", "heuristic": "grad_norm", "lora_r": 4, "lora_alpha": 8.0}
    (tmp_path / "s.json").write_text(json.dumps({**scores, "modules": modules}))
    planned = run_cli(
        "plan", "s.json", "--keep", "0.5", "--redistribute", "--out", "plan.yaml", "--peft-out", "lora.json",
        cwd=tmp_path,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    plan = yaml.safe_load((tmp_path / "plan.yaml").read_text())["modules"]
    kept = {name: entry["rank"] for name, entry in plan.items() if entry["enabled"] and "residual" not in name}
    fields = json.loads((tmp_path / "lora.json").read_text())
    assert fields["r"] == 4 and fields["lora_alpha"] == 8.0 and sorted(fields["target_modules"]) == sorted(kept)

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(make_model_dir("llama")), LoraConfig(**fields))
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert {name: layer.r["default"] for name, layer in layers.items()} == kept
    assert len(set(kept.values())) > 1  # redistributed
    assert all(layer.scaling["default"] == pytest.approx(8.0 / 4) for layer in layers.values())


def test_peft_out_needs_a_json_name(tmp_path):
    result = run_cli("plan", "s.json", "--out", "plan.yaml", "--peft-out", "lora.yaml", cwd=tmp_path)
    assert_clean_error(result, 2, "--peft-out expects a .json file name")
