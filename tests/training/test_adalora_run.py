"""AdaLoRA through the YAML path on a tiny llama: the total rank follows PEFT's budget schedule, export, resume."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ranktune.config import validate_config
from ranktune.training import train
from tests.training.resume import assert_resume_is_exact, history, over_two_epochs
from tests.training.test_run import text_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]  # 2 layers: 10 modules
ADALORA = {"method": "adalora", "init_r": 6, "target_r": 3, "tinit": 4, "tfinal": 0.25, "deltaT": 2}


def adalora_config(model_dir, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = text_config(model_dir, tmp_path, max_steps=24, logging_steps=4, seed=3)
    config["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS}
    config["allocation"] = dict(ADALORA)
    return config


def scheduled_budget(step: int, total: int = 24, tinit: int = 4, tfinal: int = 6) -> int:
    """AdaLoRA's cubic budget (the paper's schedule), computed here by hand: 60 ranks at the start, 30 at the end."""
    initial, final = 10 * 6, 10 * 3
    if step > total - tfinal:
        return final
    return int((initial - final) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3 + final)


def test_total_rank_follows_the_budget_schedule_and_export_loads(make_model_dir, tmp_path):
    model_dir = make_model_dir("llama")
    result = train(validate_config(adalora_config(model_dir, tmp_path)))
    records = history(result.output_dir)
    # masks every deltaT = 2 steps after tinit = 4 until the final mask at 24 - 6 = 18, then held
    assert [r["step"] for r in records] == [0, 6, 8, 10, 12, 14, 16, 18]
    assert records[0]["total_rank"] == 60
    assert [r["total_rank"] for r in records[1:]] == [scheduled_budget(r["step"]) for r in records[1:]]
    assert records[-1]["total_rank"] == 30 and records[-1]["budget"] == 30
    final = {name: m["rank"] for name, m in records[-1]["modules"].items()}
    assert len(set(final.values())) > 1, "the budget went to some modules more than others"

    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["rank_pattern"] == {name: rank for name, rank in final.items() if rank}
    logs = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["active_rank"] for e in logs if "loss" in e][-1] == 30
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), result.output_dir)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_interrupted_and_resumed_adalora_run_gives_the_same_adapter(make_model_dir, tmp_path):
    """With LoRA dropout, from checkpoints in the second epoch of 16 steps, whose budget shrinks from step 4 to 12:
    at step 12, at step 8 (the epoch's start) and at step 11 (where a SIGTERM stopped the run)."""
    model_dir = make_model_dir("llama")
    straight, checkpointed = (over_two_epochs(adalora_config(model_dir, tmp_path / name)) for name in "ab")
    assert_resume_is_exact(straight, checkpointed, save_steps=4, resume_steps=[12, 8], stop_after=11)
