"""What ranktune runs under DeepSpeed and what it refuses, checked from the config (no deepspeed package needed).

The runs themselves (2 processes, ZeRO-2 and ZeRO-3) are in tests/distributed/test_deepspeed.py.
"""

from __future__ import annotations

import importlib.util
import json
import pickle

import pytest
import torch

from ranktune.config import validate_config
from ranktune.errors import UserInputError
from ranktune.training import zero
from ranktune.training.zero import check_deepspeed, deepspeed_requested, load_weights_only


def config(allocation: str = "none", **sections):
    return validate_config(
        {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}, "allocation": {"method": allocation}, **sections}
    )


ZERO2 = {"zero_optimization": {"stage": 2}}


@pytest.fixture
def deepspeed_installed(monkeypatch):
    """As if the deepspeed package were installed (the check only looks for it)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(zero.importlib.util, "find_spec", lambda name: object() if name == "deepspeed" else real(name))


def test_requested_by_the_training_section_or_by_accelerate(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert deepspeed_requested({"deepspeed": "ds.json"}) and not deepspeed_requested({"fsdp": True})
    for value in ("true", "1", "yes"):  # as transformers reads it
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", value)
        assert deepspeed_requested({})


@pytest.mark.parametrize(
    ("allocation", "accepted"), [("none", True), ("eva", True), ("gradient", True), ("l1ra", False), ("adalora", False)]
)
def test_methods_that_edit_the_adapter_during_training_are_refused(allocation, accepted, deepspeed_installed):
    values = {"deepspeed": {"zero_optimization": {"stage": 2}}}
    if accepted:
        assert check_deepspeed(config(allocation), values)["deepspeed"]["zero_optimization"] == {"stage": 2}
        return
    with pytest.raises(UserInputError) as error:
        check_deepspeed(config(allocation), values)
    message = str(error.value)
    assert f"allocation.method '{allocation}' with DeepSpeed is not supported" in message
    assert "training.fsdp: true" in message
    runnable = set(message.split("ranktune runs ")[1].split(", "))
    assert runnable == {"none", "eva", "gradient"}


def test_hetero_is_refused_too(deepspeed_installed):
    hetero = validate_config(
        {
            "model": {"name_or_path": "m"},
            "data": {"train": "t.jsonl"},
            "allocation": {"method": "hetero", "keep": 0.5},
        }
    )
    with pytest.raises(UserInputError, match="'hetero' with DeepSpeed is not supported"):
        check_deepspeed(hetero, {"deepspeed": ZERO2})


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"model": {"name_or_path": "m", "quantization": "4bit"}}, "model.quantization: '4bit' with DeepSpeed"),
        ({"lora": {"init": "pissa"}}, "lora.init: 'pissa' with DeepSpeed"),
    ],
)
def test_untested_combinations_are_refused(sections, expected, deepspeed_installed):
    with pytest.raises(UserInputError, match=expected):
        check_deepspeed(config(**sections), {"deepspeed": ZERO2})


def test_fsdp_and_deepspeed_together_are_refused(deepspeed_installed):
    with pytest.raises(UserInputError, match=r"training\.deepspeed and training\.fsdp both shard the model"):
        check_deepspeed(config(), {"deepspeed": ZERO2, "fsdp": True})


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(zero.importlib.util, "find_spec", lambda name: None if name == "deepspeed" else real(name))
    with pytest.raises(UserInputError, match=r"pip install 'ranktune\[deepspeed\]'"):
        check_deepspeed(config(), {"deepspeed": ZERO2})


def test_a_config_file_is_read_and_completed(tmp_path, deepspeed_installed):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 2}))
    values = check_deepspeed(config(), {"deepspeed": str(path), "learning_rate": 1e-3})
    assert values["learning_rate"] == 1e-3
    assert values["deepspeed"] == {
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
        "gradient_accumulation_steps": 2,  # the user's value stays
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
    }
    assert json.loads(path.read_text()) == {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 2}


def test_zero3_without_whole_adapter_checkpoints_is_refused(deepspeed_installed):
    values = {"deepspeed": {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}}
    with pytest.raises(UserInputError, match="stage3_gather_16bit_weights_on_model_save: false leaves checkpoints"):
        check_deepspeed(config(), values)


def test_deepspeed_from_an_accelerate_config_is_refused_first(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(UserInputError, match="DeepSpeed from an accelerate config is not tested"):
        check_deepspeed(config("l1ra"), {"fsdp": True})


@pytest.mark.parametrize("zero_optimization", [None, {"stage": 0}, {"stage": 1}])
def test_zero_stages_other_than_2_and_3_are_refused(zero_optimization, deepspeed_installed):
    deepspeed = {"train_batch_size": 8} if zero_optimization is None else {"zero_optimization": zero_optimization}
    with pytest.raises(UserInputError, match=r"zero_optimization\.stage \d is not tested by ranktune; expected 2 or 3"):
        check_deepspeed(config(), {"deepspeed": deepspeed})


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"checkpoint": {"load_universal": True}}, "checkpoint.load_universal"),
        ({"checkpoint": {"writer": {"type": "fast"}}}, "checkpoint.writer"),
        ({"datastates_ckpt": {}}, "datastates_ckpt"),
    ],
)
def test_checkpoint_loaders_that_unpickle_are_refused(extra, named, deepspeed_installed):
    deepspeed = {"zero_optimization": {"stage": 2}, **extra}
    with pytest.raises(UserInputError, match=f"{named} reads checkpoints with a loader that unpickles"):
        check_deepspeed(config(), {"deepspeed": deepspeed})


class WritesAFile:
    """Unpickled without weights_only, it creates a file: the proof that loading ran code."""

    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return (type(self.path).touch, (self.path,))


def test_checkpoint_files_are_read_weights_only(tmp_path):
    tensors = tmp_path / "state.pt"
    torch.save({"step": 3, "exp_avg": torch.ones(2)}, tensors)
    loaded = load_weights_only(str(tensors), allowed=[])
    assert loaded["step"] == 3 and torch.equal(loaded["exp_avg"], torch.ones(2))

    hostile, marker = tmp_path / "optim_states.pt", tmp_path / "code-ran"
    with hostile.open("wb") as stream:
        pickle.dump({"optimizer_state_dict": WritesAFile(marker)}, stream)  # the legacy format DeepSpeed writes
    with pytest.raises(UserInputError) as error:
        load_weights_only(str(hostile), allowed=[])
    assert not marker.exists()
    assert "holds pickled objects other than tensors" in str(error.value)
    assert "(Unsupported operand" in str(error.value) or "was not an allowed global" in str(error.value)


@pytest.mark.parametrize(
    ("content", "expected"), [(None, "no file"), ("{not json", "cannot read"), ("[1, 2]", "holds a JSON list")]
)
def test_an_unreadable_config_file_is_one_clear_error(tmp_path, content, expected, deepspeed_installed):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserInputError, match=expected):
        check_deepspeed(config(), {"deepspeed": str(path)})
