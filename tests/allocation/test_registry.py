"""The registry: one declaration per method, refused duplicates, config checks derived from capabilities."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest
from peft import LoraConfig

from ranktune.allocation import registry
from ranktune.allocation.l1ra import L1RAConfig
from ranktune.allocation.registry import (
    AdaptedModel,
    Capabilities,
    MethodSettings,
    register_allocation_method,
    registered_methods,
)
from ranktune.config import validate_config

SOURCE = Path(registry.__file__).parents[1]
# The drop-in PEFT-style configs, by the method whose settings they carry.
DROP_IN_CONFIGS = {"l1ra": L1RAConfig}


def build_nothing(model, config, context) -> AdaptedModel:
    raise AssertionError("not built in these tests")


class SketchSettings(MethodSettings):
    method: Literal["sketch"] = "sketch"


CAPABILITIES = Capabilities(
    shortcuts=False,
    plans=False,
    per_module_settings=False,
    rank_pattern=True,
    dora=False,
    lora_init=False,
    calibration_batches=False,
    moves_ranks="during_training",
)


@pytest.fixture
def open_registry(monkeypatch) -> Iterator[None]:
    """The registry as it is before ranktune.config closes it; what a test registers is removed afterwards."""
    monkeypatch.setattr(registry, "_config_built", False)
    names = set(registry._METHODS)
    yield
    for name in set(registry._METHODS) - names:
        del registry._METHODS[name]


@pytest.fixture
def sketch(open_registry) -> None:
    """A method registered for one test: no plans, no per-module settings, no dora, no shortcuts."""
    register_allocation_method(name="sketch", settings=SketchSettings, build=build_nothing, capabilities=CAPABILITIES)


def test_builtin_methods_in_order():
    assert [m.name for m in registered_methods()] == ["none", "gradient", "l1ra", "adalora", "hetero", "eva"]


def test_a_duplicate_name_is_refused(open_registry):
    with pytest.raises(ValueError, match="allocation method 'l1ra' is already registered"):
        register_allocation_method(
            name="l1ra", settings=registered_methods()[1].settings, build=build_nothing, capabilities=CAPABILITIES
        )


def test_settings_must_declare_their_method_name(open_registry):
    with pytest.raises(ValueError, match="must declare `method: Literal\\['other'\\]`"):
        register_allocation_method(
            name="other", settings=SketchSettings, build=build_nothing, capabilities=CAPABILITIES
        )
    assert "other" not in registry._METHODS


def test_registering_after_the_config_was_built_is_refused():
    """The config's types were derived when it was imported: a later method would be silently unknown to it."""
    import ranktune.config  # noqa: F401 - builds the config's types

    with pytest.raises(RuntimeError, match=r"registered after ranktune\.config was imported"):
        register_allocation_method(name="late", settings=SketchSettings, build=build_nothing, capabilities=CAPABILITIES)
    assert "late" not in registry._METHODS


def test_capabilities_must_all_be_declared():
    with pytest.raises(TypeError):
        Capabilities(shortcuts=True)  # type: ignore[call-arg]


def test_calibration_batches_only_for_methods_that_declare_them():
    context = registry.BuildContext(args=None, train_dataset=[], collator=None, output_dir=Path("."), seed=0)
    refused = dataclasses.replace(context, calibration_allowed=False)
    with pytest.raises(RuntimeError, match="draws calibration batches"):
        refused.calibration_batches(1)


def test_compatibility_checks_follow_the_capabilities(sketch):
    """The `lora` keys a method refuses come from its capabilities; the list of shortcut-capable methods too."""
    from ranktune.config import LoraSettings, ShortcutSettings

    def check(lora: LoraSettings, shortcuts: ShortcutSettings | None = None) -> None:
        registry.check_compatibility(SimpleNamespace(allocation=SketchSettings(), lora=lora, shortcuts=shortcuts))

    check(LoraSettings(rank_pattern={"q_proj": 2}, rslora=True))  # what its capabilities allow passes
    with pytest.raises(ValueError, match=r"^allocation.method 'sketch' does not support lora.modules$"):
        check(LoraSettings(modules={"q_proj": {"r": 2}}))
    with pytest.raises(ValueError, match=r"^allocation.method 'sketch' does not support lora.dora$"):
        check(LoraSettings(dora=True, plan=None))
    with pytest.raises(ValueError, match=r"^shortcuts train with allocation.method none or hetero, not 'sketch' "):
        check(LoraSettings(), ShortcutSettings())


@pytest.mark.parametrize("name", list(DROP_IN_CONFIGS))
def test_a_drop_in_config_takes_its_fields_and_defaults_from_the_settings(name):
    settings = next(m.settings for m in registered_methods() if m.name == name)
    drop_in = DROP_IN_CONFIGS[name]
    lora_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    own = {f.name: f.default for f in dataclasses.fields(drop_in) if f.name not in lora_fields}
    yaml_only = getattr(drop_in, "yaml_only", frozenset())  # what the drop-in trainers cannot take, declared
    expected = {k: field.default for k, field in settings.model_fields.items() if k != "method" and k not in yaml_only}
    assert own == expected
    config = validate_config({"model": {"name_or_path": "m"}, "data": {"train": "t"}, "allocation": {"method": name}})
    assert drop_in(r=4).settings() == config.allocation


def test_a_drop_in_config_is_validated_like_the_yaml():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="eta_c"):
        L1RAConfig(r=4, eta_c=-1.0).settings()


def method_comparisons(path: Path) -> list[str]:
    """`x.method == "name"`-style tests (==, !=, in, not in against string constants) in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names_method = any(isinstance(o, ast.Attribute) and o.attr == "method" for o in operands)
        constants = [c for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant) and type(c.value) is str]
        if names_method and constants:
            found.append(f"{path.relative_to(SOURCE)}:{node.lineno}")
    return found


def test_no_module_dispatches_on_the_method_name():
    own = {SOURCE / "allocation" / "registry.py"}
    found = [hit for path in sorted(SOURCE.rglob("*.py")) if path not in own for hit in method_comparisons(path)]
    assert found == []


def test_sharded_calibration_batches_share_out_the_first_ones():
    """Process k of W takes batches k, k + W, ... of the first `count`: together they see each batch once."""
    rows = [{"x": i} for i in range(10)]
    batches = {}
    for rank in range(2):
        args = SimpleNamespace(per_device_train_batch_size=2, process_index=rank, world_size=2)
        context = registry.BuildContext(args, rows, lambda batch: [row["x"] for row in batch], Path("."), seed=0)
        batches[rank] = context.calibration_batches(4, shard=True)
    assert batches == {0: [[0, 1], [4, 5]], 1: [[2, 3], [6, 7]]}
    assert context.calibration_batches(2, batch_size=3) == [[0, 1, 2], [3, 4, 5]]  # unsharded, own batch size


def test_sampled_batches_draw_the_same_rows_whatever_the_process_count():
    """A draw is a prefix of a seeded permutation of the rows: 2 processes x 4 rows see exactly the rows 1 process x
    8 rows sees, every process gets the whole list, and another draw gives other rows."""
    rows = [{"row": i} for i in range(100)]

    def context(per_device: int, world: int, seed: int = 3) -> registry.BuildContext:
        args = SimpleNamespace(per_device_train_batch_size=per_device, world_size=world)
        return registry.BuildContext(args, rows, lambda batch: [r["row"] for r in batch], Path("."), seed=seed)

    one = context(8, 1).sampled_batches(3, draw=40)
    two = context(4, 2).sampled_batches(3, draw=40)
    assert [len(b) for b in one] == [8] * 3 and [len(b) for b in two] == [4] * 6
    assert [r for b in one for r in b] == [r for b in two for r in b]
    drawn = [r for b in one for r in b]
    assert len(set(drawn)) == 24 and drawn != list(range(24))  # without replacement, not the first rows
    assert [r for b in context(8, 1).sampled_batches(3, draw=41) for r in b] != drawn
    assert [r for b in context(8, 1, seed=4).sampled_batches(3, draw=40) for r in b] != drawn
