"""`lora.plan` and the reference TOMLs: read once, when the config is validated, before torch or any data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from ranktune.adapters.shortcut_types import ShortcutSpec
from ranktune.allocation import plan_file
from ranktune.allocation.plan_file import PLAN_FORMAT, read_plan
from ranktune.config import LoraSettings, validate_config
from ranktune.errors import UserInputError

MODULES = {
    "model.layers.0.self_attn.q_proj": {"enabled": True, "rank": 6, "score": 3.0},
    "model.layers.1.self_attn.q_proj": {"enabled": False, "rank": 0, "score": 1.0},
    "model.layers.1.residual1": {"enabled": True, "rank": 2, "score": 2.0},
    "model.layers.0.residual2": {"enabled": False, "rank": 0, "score": 0.5},
}


def write_plan(folder: Path, modules: dict = MODULES) -> Path:
    path = folder / "plan.yaml"
    path.write_text(yaml.safe_dump({"format": PLAN_FORMAT, "modules": modules}))
    return path


def config_with(**lora) -> dict:
    return {"model": {"name_or_path": "m"}, "data": {"train": "t"}, "lora": lora}


def test_a_plan_sets_targets_ranks_and_keeps_the_pools_scale(tmp_path):
    plan = read_plan(write_plan(tmp_path))
    assert plan.lora_ranks == {"model.layers.0.self_attn.q_proj": 6} and plan.has_shortcuts
    lora = plan.apply_to_lora(LoraSettings(r=4, alpha=8.0))
    assert lora.target_modules == ["model.layers.0.self_attn.q_proj"]
    assert lora.rank_pattern == {"model.layers.0.self_attn.q_proj": 6}
    assert lora.alpha_pattern == {"model.layers.0.self_attn.q_proj": 12.0}  # 8 / 4 = 12 / 6
    specs = {(1, "residual1"): ShortcutSpec(4, 8.0, 0.1), (0, "residual2"): ShortcutSpec(4, 8.0, 0.0)}
    assert plan.apply_to_shortcuts(specs) == {(1, "residual1"): ShortcutSpec(2, 4.0, 0.1)}


def test_the_config_reads_its_plan_once(tmp_path):
    path = write_plan(tmp_path)
    with mock.patch.object(plan_file, "read_yaml_mapping", wraps=plan_file.read_yaml_mapping) as reads:
        config = validate_config(config_with(plan=str(path)))
        changed = config.lora.model_copy(update={"r": 16})  # as the run's steps derive settings from the section
        assert changed.plan_file() is config.lora.plan_file()
        assert read_plan(path).lora_ranks == {"model.layers.0.self_attn.q_proj": 6}
        assert reads.call_count == 1
        plan = read_plan(write_plan(tmp_path, {"model.layers.0.mlp.up_proj": {"enabled": True, "rank": 3}}))
        assert plan.lora_ranks == {"model.layers.0.mlp.up_proj": 3}  # a rewritten file is read again
    assert reads.call_count == 2


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        ({"model.layers.0.residual1": {"enabled": True, "rank": 2}}, "enables no LoRA module"),
        ({"model.layers.0.mlp.up_proj": {"enabled": True, "rank": 0}}, "needs a rank > 0"),
        ({"model.layers.0.mlp.up_proj": {"enabled": False}}, "enables no module"),
    ],
)
def test_a_bad_plan_is_a_config_error(tmp_path, modules, expected):
    with pytest.raises(UserInputError, match=expected):
        validate_config(config_with(plan=str(write_plan(tmp_path, modules))))


CHECK_IN_A_FRESH_PROCESS = """
import sys
from ranktune.config import validate_config
from ranktune.errors import UserInputError
try:
    validate_config({"model": {"name_or_path": "m"}, "data": {"train": "t"}, "lora": {sys.argv[1]: sys.argv[2]}})
except UserInputError as error:
    print(error)
print("torch" in sys.modules)
"""


@pytest.mark.parametrize(
    ("key", "content", "expected"),
    [
        ("plan", "format: ranktune-plan-1\nmodules: {}\n", "lora.plan: "),
        ("reference_config", "granularity = 'tensor'\n", 'granularity must be "network" or "layer"'),
    ],
)
def test_named_files_are_checked_with_the_config_before_torch(tmp_path, key, content, expected):
    path = tmp_path / "named-file"
    path.write_text(content)
    result = subprocess.run(
        [sys.executable, "-c", CHECK_IN_A_FRESH_PROCESS, key, str(path)], capture_output=True, text=True, timeout=120
    )
    message, torch_imported = result.stdout.splitlines()
    assert expected in message and torch_imported == "False", result.stderr
