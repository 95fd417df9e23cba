"""The study's bookkeeping: how runs are compared, and the record cache that lets a stopped study resume."""

from __future__ import annotations

import json
import math

from benchmarks.quality import RecordStore, comparable
from benchmarks.quality_report import rank_spread
from benchmarks.quality_study import PROFILES


def test_larger_is_better_after_comparable_and_a_diverged_run_is_worst():
    classification, causal = PROFILES["cpu"]().tasks
    assert comparable(0.8, classification) > comparable(0.7, classification)
    assert comparable(1.5, causal) > comparable(2.0, causal)
    for task in (classification, causal):
        assert comparable(math.nan, task) < comparable(-1e9, task)
        assert comparable(math.inf, task) == -math.inf


def test_the_last_line_of_a_run_wins_and_a_torn_line_is_skipped(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    store.append({"id": "a", "task": "t", "method": "m", "test": None})
    store.append({"id": "b", "task": "u", "method": "m", "test": None})
    store.append({"id": "a", "task": "t", "method": "m", "test": {"accuracy": 0.8}})
    with store.path.open("a") as out:
        out.write('{"id": "c", "task"')  # killed while writing
    assert store.load() == {
        "a": {"id": "a", "task": "t", "method": "m", "test": {"accuracy": 0.8}},
        "b": {"id": "b", "task": "u", "method": "m", "test": None},
    }


def test_forget_drops_only_the_chosen_cells(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    for key, task, method in [("1", "t", "m"), ("2", "t", "n"), ("3", "u", "m")]:
        store.append({"id": key, "task": task, "method": method})
    store.append({"id": "base", "task": "t", "baseline": True})
    store.forget({"t"}, {"m"})
    assert sorted(store.load()) == ["2", "3"]
    assert [json.loads(line)["id"] for line in store.path.read_text().splitlines()] == ["2", "3"]


def test_rank_spread_reads_the_adapter(tmp_path):
    import torch
    from safetensors.torch import save_file

    prefix = "base_model.model.model.layers"
    tensors = {
        f"{prefix}.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 16),
        f"{prefix}.0.self_attn.q_proj.lora_B.weight": torch.zeros(16, 2),
        f"{prefix}.1.self_attn.q_proj.lora_A.weight": torch.zeros(5, 16),
        f"{prefix}.1.self_attn.q_proj.lora_B.weight": torch.zeros(16, 5),
    }
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    assert rank_spread(str(tmp_path)) == "2 × r 2–5"
    save_file({"other": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    assert rank_spread(str(tmp_path)) == "none"
