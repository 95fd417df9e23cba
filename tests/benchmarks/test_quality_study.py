"""The quality study's definitions: every run config is valid, every method gets the same tuning budget, and the
HeteroLoRA pools stay at the budget they are compared at."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.quality_study import BUDGET_R, PROFILES, grid, run_config, run_id
from ranktune.config import validate_config


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_run_of_every_profile_is_a_valid_config(name):
    profile = PROFILES[name]()
    for task in profile.tasks:
        for method in profile.methods:
            for point in grid(task, method):
                config = validate_config(run_config(task, method, point, profile.seeds[-1], "out"))
                assert config.training["learning_rate"] == point.learning_rate
                assert config.training["seed"] == profile.seeds[-1]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_method_gets_the_same_tuning_budget_and_three_seeds(name):
    profile = PROFILES[name]()
    assert len(profile.seeds) >= 3
    for task in profile.tasks:
        sizes = {method.name: len(grid(task, method)) for method in profile.methods}
        expected = len(task.learning_rates) * (2 if task.knobs_tuned else 1)
        assert set(sizes.values()) == {expected}, sizes


def test_hetero_pools_keep_the_r8_budget_whatever_their_rank():
    profile = PROFILES["cpu"]()
    task = profile.tasks[0]
    pools = [method for method in profile.methods if method.pool]
    assert {method.name for method in pools} == {"hetero-static", "hetero-dynamic", "hetero-shortcuts"}
    for method in pools:
        for point in grid(task, method):
            config = run_config(task, method, point, 0, "out")
            r = config["lora"]["r"]
            assert config["lora"]["alpha"] == 2 * r  # the scale 2 of LoRA r 8, alpha 16
            if config["allocation"]["method"] == "hetero":
                assert config["allocation"]["keep"] * r == BUDGET_R
    dynamic = next(method for method in pools if method.name == "hetero-dynamic")
    assert [run_config(task, dynamic, p, 0, "x")["allocation"]["keep"] for p in grid(task, dynamic)] == [
        0.25, 0.25, 0.5, 0.5,
    ]  # fmt: skip


def test_run_id_names_what_defines_a_run_not_where_it_is_written():
    profile = PROFILES["cpu"]()
    task, method = profile.tasks[0], profile.methods[0]
    point = grid(task, method)[0]
    first = run_id(run_config(task, method, point, 0, "a"), method, task)
    assert first == run_id(run_config(task, method, point, 0, "b"), method, task)
    assert first != run_id(run_config(task, method, point, 1, "a"), method, task)
    assert first != run_id(run_config(task, method, grid(task, method)[1], 0, "a"), method, task)


def test_a_static_search_run_is_keyed_by_its_saliency_batches_too():
    profile = PROFILES["cpu"]()
    task = profile.tasks[0]
    static = next(method for method in profile.methods if method.static_search)
    config = run_config(task, static, grid(task, static)[0], 0, "out")
    fewer = dataclasses.replace(task, saliency_batches=task.saliency_batches // 2)
    assert run_id(config, static, task) != run_id(config, static, fewer)


def test_adalora_trains_at_the_scale_of_the_others():
    profile = PROFILES["cpu"]()
    task = profile.tasks[0]
    adalora = next(method for method in profile.methods if method.name == "adalora")
    for point in grid(task, adalora):
        config = run_config(task, adalora, point, 0, "out")
        assert config["lora"]["alpha"] / config["allocation"]["init_r"] == 2  # PEFT: alpha / init_r; LoRA r 8: 16 / 8
