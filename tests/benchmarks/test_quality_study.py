"""The quality study's definitions and scheduling: every run config is valid, every method gets the same tuning, the
budgets are what they claim, and a choice at a grid's edge extends the grid."""

from __future__ import annotations

import pytest

from benchmarks.quality import RecordStore, pending, select
from benchmarks.quality_study import PROFILES, base_grid, extension, run_config, run_id
from ranktune.config import validate_config


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_run_of_every_profile_is_a_valid_config(name):
    profile = PROFILES[name]()
    assert len(profile.seeds) >= 5
    for task in profile.tasks:
        for method in profile.methods:
            grid = base_grid(task, method)
            assert len(grid) == 3
            for lr in grid:
                config = validate_config(run_config(task, method, lr, profile.seeds[-1], "out"))
                assert config.training["learning_rate"] == lr and config.training["seed"] == profile.seeds[-1]


def test_task_lora_settings_reach_every_method():
    profile = PROFILES["cpu"]()
    minilm = profile.tasks[0]
    for method in profile.methods:
        lora = run_config(minilm, method, 1e-3, 0, "out")["lora"]
        assert lora["modules_to_save"] == ["pooler"] and lora["exclude_modules"] == ["pooler.dense"]
        assert lora["r"] == method.sections["lora"]["r"]


def test_cpu_profile_schedules_are_long_enough_and_budgets_match():
    profile = PROFILES["cpu"]()
    steps = {task.name: task.steps for task in profile.tasks}
    assert all(steps[name] >= 300 for name in steps if name.startswith("minilm")) and steps["smollm2-qa"] >= 100
    assert len([t for t in profile.tasks if t.model["task"] == "classification"]) >= 3
    assert any("text_pair_column" in t.data for t in profile.tasks)
    frontier = sorted(m.budget_r for m in profile.methods if m.frontier)
    assert frontier == [1, 2, 4, 8, 16]
    for method in profile.methods:  # a parameter-budget method runs on the LoRA rank it is matched to
        if method.sections["allocation"]["method"] in ("gradient", "l1ra"):
            assert method.sections["lora"]["r"] == method.budget_r
    assert {m.budget_r for m in profile.methods if not (m.frontier or m.baseline)} == {1, 2, 8}
    names = {m.name for m in profile.methods}
    assert all(m.peer in names for m in profile.methods if m.peer)


def test_the_placements_below_r1_adapt_the_modules_they_name():
    """PEFT matches the study's regex targets; MiniLM's names are BERT's, SmolLM2's llama's."""
    import re

    from benchmarks.quality_study import below_r1

    bert = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "key", "value")]
    bert += [f"bert.encoder.layer.{i}.{p}.dense" for i in range(6) for p in ("attention.output", "intermediate")]
    llama = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(30) for p in "qkvo"]
    targets = {m.name: m.sections["lora"]["target_modules"] for m in below_r1() if m.baseline}
    for names, expected in ((bert, (12, 1)), (llama, (60, 1))):
        matched = [sum(bool(re.fullmatch(targets[key], n)) for n in names) for key in ("lora-qv-r1", "lora-one-r1")]
        assert tuple(matched) == expected


def test_extension_goes_past_an_edge_twice_at_most():
    assert extension([1.0, 2.0, 4.0], 4.0) == 8.0
    assert extension([1.0, 2.0, 4.0], 1.0) == 0.5
    assert extension([1.0, 2.0, 4.0], 2.0) is None
    assert extension([1.0, 2.0, 4.0, 8.0, 16.0], 16.0) is None


def _record(task, method, lr, seed, value):
    return {"id": run_id(task, method, lr, seed), "validation": {task.metric: value}}


def test_selection_extends_the_grid_then_runs_the_other_seeds():
    profile = PROFILES["cpu"]()
    task, method = profile.tasks[0], profile.methods[3]  # Rotten Tomatoes, LoRA r 8: grid 1e-3, 2e-3, 4e-3
    records = {}
    assert [s.learning_rate for s in pending(task, method, profile.seeds, records)] == [1e-3, 2e-3, 4e-3]
    for lr, value in ((1e-3, 0.70), (2e-3, 0.75), (4e-3, 0.80)):  # best at the upper edge
        records[run_id(task, method, lr, 0)] = _record(task, method, lr, 0, value)
    assert [s.learning_rate for s in pending(task, method, profile.seeds, records)] == [8e-3]
    records[run_id(task, method, 8e-3, 0)] = _record(task, method, 8e-3, 0, 0.78)  # inside now: 4e-3 chosen
    assert select(task, method, 0, records).chosen == 4e-3
    specs = pending(task, method, profile.seeds, records)
    assert [(s.learning_rate, s.seed) for s in specs] == [(4e-3, seed) for seed in profile.seeds[1:]]


def test_a_nan_never_wins_and_a_loss_is_minimised():
    profile = PROFILES["cpu"]()
    qa = next(t for t in profile.tasks if t.name == "smollm2-qa")
    method = profile.methods[0]
    grid = base_grid(qa, method)
    for losses in ([2.0, 1.5, float("nan")], [float("nan"), 1.5, 2.0]):  # the middle one is the lowest loss
        values = dict(zip(grid, losses, strict=True))
        records = {run_id(qa, method, lr, 0): _record(qa, method, lr, 0, v) for lr, v in values.items()}
        assert select(qa, method, 0, records).chosen == grid[1]


def test_run_id_names_what_defines_a_run():
    profile = PROFILES["cpu"]()
    task, method = profile.tasks[0], profile.methods[0]
    assert run_id(task, method, 1e-3, 0) == run_id(task, method, 1e-3, 0)
    assert len({run_id(task, method, 1e-3, 0), run_id(task, method, 2e-3, 0), run_id(task, method, 1e-3, 1)}) == 3


def test_records_keep_the_last_line_of_a_run_and_skip_a_torn_one(tmp_path):
    store = RecordStore(tmp_path / "records.jsonl")
    store.append({"id": "a", "value": 1})
    store.append({"id": "a", "value": 2})
    with store.path.open("a") as out:
        out.write('{"id": "b", "val')
    assert store.load() == {"a": {"id": "a", "value": 2}}
    store.append({"id": "c", "value": 3})  # after a torn line: on a line of its own
    assert store.load() == {"a": {"id": "a", "value": 2}, "c": {"id": "c", "value": 3}}
