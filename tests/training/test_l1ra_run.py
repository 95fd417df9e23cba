"""L1RA through the YAML path on a tiny llama: ranks move, budgets hold, export loads, resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ranktune.config import validate_config
from ranktune.reports import rank_evolution
from ranktune.training import train
from tests.cli.helpers import run_cli
from tests.training.resume import assert_resume_is_exact, history, over_two_epochs
from tests.training.test_run import text_config

L1RA = {"method": "l1ra", "l1ra_lambda": 2.0, "eta_c": 0.05, "rank_update_ratio": 0.125, "max_rank": 8}


def l1ra_config(model_dir: Path, tmp_path: Path, **changes) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = text_config(model_dir, tmp_path, max_steps=24, logging_steps=4, seed=3)
    config["lora"] = {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}
    config["allocation"] = {**L1RA, **changes}
    return config


def test_ranks_move_total_is_conserved_and_export_loads(make_model_dir, tmp_path):
    model_dir = make_model_dir("llama")
    result = train(validate_config(l1ra_config(model_dir, tmp_path)))
    records = history(result.output_dir)
    assert [r["step"] for r in records] == [0, 3, 6, 9, 12, 15, 18, 21]
    # budget "ranks": 10 modules x r 4; rank no module could take at an update is carried to the next one
    assert all(r["total_rank"] + r.get("unspent", 0) == 40 for r in records)
    assert records[-1]["total_rank"] == 40
    assert sum(r.get("pruned", 0) for r in records) > 0 and sum(r.get("added", 0) for r in records) > 0
    final = {name: m["rank"] for name, m in records[-1]["modules"].items()}
    assert len(set(final.values())) > 1 and max(final.values()) <= 8

    info = json.loads((result.output_dir / "ranktune.json").read_text())
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    exported = {m["module"]: m["rank"] for m in info["modules"]}
    assert exported == {name: rank for name, rank in final.items() if rank} == config["rank_pattern"]
    assert info["allocation"] == "l1ra"
    train_logs = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert next(e["active_rank"] for e in train_logs if "loss" in e) == 40
    shown = run_cli("inspect", str(result.output_dir), "--plot", str(tmp_path / "ranks.png"))
    assert shown.returncode == 0, shown.stderr
    for png in ("ranks.png", "ranks-evolution.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG" and f"plot: {tmp_path / png}" in shown.stdout
    steps, series = rank_evolution(records)
    assert steps == [r["step"] for r in records] and series["q_proj"][0] == 4.0
    assert series["q_proj"][-1] == sum(final[f"model.layers.{i}.self_attn.q_proj"] for i in range(2)) / 2
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), result.output_dir)
    with torch.no_grad():
        assert torch.isfinite(peft_model(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_params_budget_keeps_active_parameters_within_one_component(make_model_dir, tmp_path):
    result = train(validate_config(l1ra_config(make_model_dir("llama"), tmp_path, budget="params")))
    records = history(result.output_dir)
    start = records[0]["active_parameters"]
    largest_component = 64 + 32  # down_proj: 64 in + 32 out
    assert all(r["active_parameters"] + r.get("unspent", 0) == start for r in records)
    assert start - largest_component < records[-1]["active_parameters"] <= start


def test_interrupted_and_resumed_run_gives_the_same_adapter(make_model_dir, tmp_path):
    """With LoRA dropout, from checkpoints in the second epoch: at step 12 (rank updates every 2 steps), at its start
    (step 8, saved before the epoch's evaluation) and where a SIGTERM stopped the run (step 11)."""
    model_dir = make_model_dir("llama")
    straight, checkpointed = (over_two_epochs(l1ra_config(model_dir, tmp_path / name)) for name in "ab")
    assert_resume_is_exact(straight, checkpointed, save_steps=4, resume_steps=[12, 8], stop_after=11)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adafactor", "sgd"])
def test_l1ra_composes_with_the_optimizer_of_a_and_b(optim, make_model_dir, tmp_path):
    """The gates take their own proximal steps whatever trains A and B, so ranks move under every optimizer."""
    config = l1ra_config(make_model_dir("llama"), tmp_path)
    config["training"]["optim"] = optim
    records = history(train(validate_config(config)).output_dir)
    assert sum(r.get("pruned", 0) for r in records) > 0 and records[-1]["total_rank"] + records[-1]["unspent"] == 40
