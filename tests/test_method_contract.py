"""The contract every registered allocation method keeps, on every tiny model family: one table, in the style of
PEFT's `testing_common`. A new method gets all of it by registering; its settings for a tiny run go in
METHOD_SETTINGS (a method not listed runs with its defaults); a variant (settings that change how a method builds, or
one method's settings naming another's) goes in VARIANTS and is held to the same contract under its own name.

For each method or variant × family (tiny llama and GPT-2 causal LMs, a tiny BERT classifier):

1. a short run's export loads with vanilla PEFT and gives the trained model's logits (atol 1e-5);
2. save → load → save with vanilla PEFT keeps the tensors exactly and adapter_config.json (up to what PEFT rewrites
   on every load, `as_peft_reads_it`), and a second round writes the same bytes;
3. the same run, stopped after a checkpoint and resumed, ends with the uninterrupted run's adapter (atol 1e-6);
and the settings in METHOD_SETTINGS do make a rank-moving method move ranks on that run.

For each method, without a model: every setting below its numeric lower bound (read from the settings class) and an
unknown key are refused in one line naming the key, through `load_config` and through the real CLI (exit 2).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from pydantic import BaseModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from ranktune.allocation.registry import registered_methods
from ranktune.config import load_config, validate_config
from ranktune.errors import UserInputError
from ranktune.export import write_adapter
from ranktune.training import train
from tests.cli.helpers import ForkingCli
from tests.conftest import save_tiny_model
from tests.training.resume import _resume_from
from tests.training.test_run import text_config

# What makes each method act on a 16-step run (two epochs of 8 steps, batch 4, learning rate 2e-2); a method not
# listed runs on its defaults. Measured on the three families: L1RA prunes and reassigns components from step 6 on,
# ending with ranks 1-8; AdaLoRA's budget shrinks from 6 to 3 per module over steps 2-12, some modules to rank 0;
# HeteroLoRA keeps the top 25% of the modules, chosen again at steps 0, 4, 8 and 12.
METHOD_SETTINGS: dict[str, dict[str, object]] = {
    "l1ra": {"l1ra_lambda": 1.5, "eta_c": 0.1, "rank_update_ratio": 0.125},
    "adalora": {"init_r": 6, "target_r": 3, "tinit": 2, "tfinal": 4, "deltaT": 2},
    "hetero": {"every": 4, "batches": 2},
    "eva": {"rho": 2.0, "batches": 4},
    "gradient": {"rho": 2.0, "batches": 2},
}
# Variants: a registered method with settings that change how it builds, held to the same contract under their own
# name. The gradient method starting the adapter as a step down the gradient (B not 0 at step 0); L1RA started from
# the gradient method's ranks and factors (budget in parameters, as the gradient method's).
VARIANTS: dict[str, dict[str, object]] = {
    "gradient-step": {"method": "gradient", **METHOD_SETTINGS["gradient"], "init": "step"},
    "l1ra+gradient": {
        "method": "l1ra",
        **METHOD_SETTINGS["l1ra"],
        "budget": "params",
        "start": {"method": "gradient", **METHOD_SETTINGS["gradient"]},
    },
}
METHODS = [method.name for method in registered_methods()]
CASES = METHODS + list(VARIANTS)
CAPABILITIES = {method.name: method.capabilities for method in registered_methods()}
FAMILIES = {"llama": "causal_lm", "gpt2": "causal_lm", "bert": "classification"}
STEPS = 16
LEARNING_RATE = 2e-2  # with 5e-3, L1RA's decaying gates left the BERT logits within 1e-5 of no adapter at all
SAVE_STEPS = 5  # checkpoints at 5, 10 and 15
RESUME_FROM = 10  # mid-way through the second epoch
# A fixed input for the logits: two rows of ids from the tiny character-level vocabulary, no padding.
INPUT_IDS = torch.tensor([[9, 20, 31, 42, 53, 64, 75, 86], [12, 14, 16, 18, 20, 22, 24, 26]])


def _settings(case: str) -> dict[str, object]:
    if case in VARIANTS:
        return copy.deepcopy(VARIANTS[case])
    return {"method": case, **METHOD_SETTINGS.get(case, {})}


def _method(case: str) -> str:
    """The registered method a case runs."""
    return str(_settings(case)["method"])


def _auto_class(family: str):
    return AutoModelForSequenceClassification if FAMILIES[family] == "classification" else AutoModelForCausalLM


def _inputs(family: str) -> dict[str, torch.Tensor]:
    if FAMILIES[family] == "classification":
        return {"input_ids": INPUT_IDS, "attention_mask": torch.ones_like(INPUT_IDS)}
    return {"input_ids": INPUT_IDS}


def _classification_config(model_dir: Path, folder: Path) -> dict:
    """40 labelled sentences: a seeded 4 become validation, 32 train (8 steps an epoch at batch 4)."""
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = []
    for i in range(40):
        word = words[(i * 7) % len(words)]
        rows.append(json.dumps({"text": f"it was {word} {i}", "label": "pos" if word in words[:3] else "neg"}))
    data = folder / "train.jsonl"
    data.write_text("\n".join(rows) + "\n")
    return {
        "model": {"name_or_path": str(model_dir), "task": "classification"},
        "data": {"train": str(data), "max_length": 16, "max_train_samples": 32},
        "training": {"per_device_train_batch_size": 4, "save_strategy": "no", "seed": 3},
        "output_dir": str(folder / "out"),
    }


def run_config(model_dir: Path, folder: Path, case: str, family: str) -> dict:
    """A two-epoch run of STEPS steps with LoRA dropout on every linear layer, the method's settings applied."""
    folder.mkdir(parents=True, exist_ok=True)
    if FAMILIES[family] == "classification":
        config = _classification_config(model_dir, folder)
    else:
        config = text_config(model_dir, folder, seed=3)
        config["data"]["max_train_samples"] = 2  # 32 blocks of 32 tokens: 8 steps an epoch at batch 4
    config["training"].update(max_steps=STEPS, learning_rate=LEARNING_RATE)
    config["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}
    config["allocation"] = _settings(case)
    return config


@dataclass
class Trained:
    """An uninterrupted run: its config, its output folder and the trained model's logits on the fixed input."""

    model_dir: Path
    config: dict
    output_dir: Path
    logits: torch.Tensor


class Runs:
    """Tiny models (one per family) and trained runs (one per method × family), made on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model_dirs: dict[str, Path] = {}
        self.runs: dict[tuple[str, str], Trained | Exception] = {}

    def model_dir(self, family: str) -> Path:
        if family not in self.model_dirs:
            self.model_dirs[family] = save_tiny_model(self.root / f"tiny-{family}", family, FAMILIES[family])
        return self.model_dirs[family]

    def get(self, case: str, family: str) -> Trained:
        key = (case, family)
        if key not in self.runs:
            try:
                self.runs[key] = self._train(case, family)
            except Exception as error:
                self.runs[key] = error
                raise
        run = self.runs[key]
        if isinstance(run, Exception):
            raise RuntimeError(f"the {case} run on {family} failed in an earlier test") from run
        return run

    def _train(self, case: str, family: str) -> Trained:
        model_dir = self.model_dir(family)
        config = run_config(model_dir, self.root / f"{case}-{family}", case, family)
        captured: list[torch.Tensor] = []

        def logits_then_export(model, *args, **kwargs):
            model.eval()
            with torch.no_grad():
                captured.append(model(**_inputs(family)).logits.detach().clone())
            return write_adapter(model, *args, **kwargs)

        with mock.patch("ranktune.training.run.write_adapter", wraps=logits_then_export) as export:
            result = train(validate_config(config))
        assert export.call_count == 1 and len(captured) == 1
        return Trained(model_dir, config, result.output_dir, captured[0])


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from a second thread, and on a shared two-core machine the waiting of torch's
    threads on a busy core made each run 10 times slower (20 s instead of 1.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("contract"))


def load_vanilla(model_dir: Path, adapter_dir: Path, family: str) -> PeftModel:
    """The adapter on its base model as plain PEFT and transformers load it, in eval mode."""
    return PeftModel.from_pretrained(_auto_class(family).from_pretrained(model_dir), adapter_dir).eval()


def assert_same_tensors(actual: Path, expected: Path, atol: float, what: str) -> None:
    got = load_file(str(actual / "adapter_model.safetensors"))
    want = load_file(str(expected / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want), what
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=atol, msg=lambda m, key=key: f"{what}, {key}: {m}")


def adapter_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def as_peft_reads_it(config: dict) -> dict:
    """adapter_config.json with what PEFT rewrites on every load and save, without changing the adapter, undone:

    - `target_modules` / `exclude_modules`: PEFT holds a list of names as a set and writes it in the set's
      iteration order, which may change from one load → save to the next (it did with PYTHONHASHSEED=5);
    - `modules_to_save`: PEFT's sequence classifier appends "classifier" and "score" on every load, so each
      load → save of a classifier adapter repeats them once more (plain PEFT does it to its own adapters too).
    """
    config = dict(config)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    if isinstance(config.get("modules_to_save"), list):
        config["modules_to_save"] = list(dict.fromkeys(config["modules_to_save"]))
    return config


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_vanilla_peft_with_the_trained_logits(case, family, runs):
    run = runs.get(case, family)
    assert json.loads((run.output_dir / "ranktune.json").read_text())["allocation"] == _method(case)
    model = load_vanilla(run.model_dir, run.output_dir, family)
    with torch.no_grad():
        logits = model(**_inputs(family)).logits
        with model.disable_adapter():
            base = model(**_inputs(family)).logits
    assert logits.shape == run.logits.shape
    torch.testing.assert_close(logits, run.logits, rtol=0, atol=1e-5)
    assert (logits - base).abs().max() > 1e-3, "the adapter barely changes the logits: the comparison proves little"


def plain_lora_ranks(model_dir: Path, family: str) -> dict[str, int]:
    """{module: rank} of plain LoRA r 4 on every linear layer, as PEFT itself places it."""
    task_type = "SEQ_CLS" if FAMILIES[family] == "classification" else "CAUSAL_LM"
    config = LoraConfig(r=4, target_modules="all-linear", task_type=task_type)
    model = get_peft_model(_auto_class(family).from_pretrained(model_dir), config)
    return {name: 4 for name, module in model.base_model.model.named_modules() if isinstance(module, LoraLayer)}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", CASES)
def test_settings_make_the_method_act(case, family, runs):
    """A method that moves ranks ends this run with another layout than plain LoRA's (else METHOD_SETTINGS is too
    weak for it and the other checks would test plain LoRA again); one that never moves them keeps plain LoRA's."""
    run = runs.get(case, family)
    info = json.loads((run.output_dir / "ranktune.json").read_text())
    ranks = {module["module"]: module["rank"] for module in info["modules"]}
    plain = plain_lora_ranks(run.model_dir, family)
    if CAPABILITIES[_method(case)].moves_ranks == "never":
        assert ranks == plain
    else:
        assert ranks != plain, f"{case} moved no rank on {family}: give it stronger METHOD_SETTINGS"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", CASES)
def test_save_load_save_keeps_the_adapter(case, family, runs, tmp_path):
    run = runs.get(case, family)
    second, third = tmp_path / "second", tmp_path / "third"
    load_vanilla(run.model_dir, run.output_dir, family).save_pretrained(second)
    assert_same_tensors(second, run.output_dir, atol=0, what="saved again by PEFT")  # exactly
    assert as_peft_reads_it(adapter_config(second)) == as_peft_reads_it(adapter_config(run.output_dir))
    load_vanilla(run.model_dir, second, family).save_pretrained(third)
    names = sorted(p.name for p in second.iterdir())
    assert names == sorted(p.name for p in third.iterdir())
    for name in names:
        if name == "adapter_config.json":  # the same keys in the same order and the same values, up to PEFT's rewrites
            third_config, second_config = (
                as_peft_reads_it(adapter_config(third)),
                as_peft_reads_it(adapter_config(second)),
            )
            assert list(third_config.items()) == list(second_config.items())
        else:
            assert (third / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", CASES)
def test_resumed_run_ends_like_the_uninterrupted_one(case, family, runs, tmp_path):
    run = runs.get(case, family)
    config = copy.deepcopy(run.config)
    config["output_dir"] = str(tmp_path / "out")
    config["training"].update(save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=None)
    out = train(validate_config(config)).output_dir
    assert_same_tensors(out, run.output_dir, atol=1e-6, what="with checkpoints, not interrupted")
    _resume_from(config, RESUME_FROM)
    assert as_peft_reads_it(adapter_config(out)) == as_peft_reads_it(adapter_config(run.output_dir))
    assert_same_tensors(out, run.output_dir, atol=1e-6, what=f"resumed from checkpoint-{RESUME_FROM}")
    method_files = next(m.history_files for m in registered_methods() if m.name == _method(case))
    for name in ("rank_history.jsonl", *method_files):  # the records after the checkpoint are written once, again
        if (run.output_dir / name).exists() or (out / name).exists():
            assert history_rows(out / name) == history_rows(run.output_dir / name), name


def history_rows(path: Path) -> list[dict]:
    """A history file's records, with every float rounded to 6 places (the resumed run's are equal to 1e-6)."""

    def rounded(value):
        if isinstance(value, float):
            return round(value, 6)
        if isinstance(value, dict):
            return {key: rounded(item) for key, item in value.items()}
        return value

    return [rounded(json.loads(line)) for line in path.read_text().splitlines()]


# --- bad settings: no model, no training -----------------------------------------------------------------------------


def below_lower_bounds(settings: type[BaseModel]) -> Iterator[tuple[str, int | float]]:
    """(field, a value below its bound) for every field with a numeric lower bound (`gt` / `ge`)."""
    for name, field in settings.model_fields.items():
        for constraint in field.metadata:
            bound = getattr(constraint, "gt", None)
            if bound is None:
                bound = getattr(constraint, "ge", None)
            if isinstance(bound, int | float) and not isinstance(bound, bool):
                yield name, bound - 1
                break


BAD_BOUNDS = [(m.name, name, bad) for m in registered_methods() for name, bad in below_lower_bounds(m.settings)]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """A valid config whose model and data need not exist: these checks end before anything is loaded."""
    path = tmp_path_factory.mktemp("bad-settings") / "run.yaml"
    path.write_text("model: {name_or_path: tiny-model}\ndata: {train: train.jsonl}\noutput_dir: out\n")
    return path


def assert_one_line_naming(error: pytest.ExceptionInfo, key: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    assert key in message, message


def test_lower_bounds_are_found_in_the_settings_classes():
    """The derivation below reads pydantic's metadata: if it found nothing anywhere, the table would test nothing."""
    assert BAD_BOUNDS, "no gt / ge bound found in any registered settings class"


@pytest.mark.parametrize(("method", "field", "bad"), BAD_BOUNDS, ids=[f"{m}-{f}" for m, f, _ in BAD_BOUNDS])
def test_setting_below_its_lower_bound_is_refused_in_one_line(method, field, bad, config_file):
    with pytest.raises(UserInputError) as error:
        load_config(config_file, [f"allocation.method={method}", f"allocation.{field}={bad!r}"])
    assert_one_line_naming(error, f"allocation.{field}")


@pytest.mark.parametrize("method", METHODS)
def test_unknown_allocation_key_is_refused_in_one_line(method, config_file):
    with pytest.raises(UserInputError) as error:
        load_config(config_file, [f"allocation.method={method}", "allocation.no_such_key=1"])
    assert_one_line_naming(error, "allocation.no_such_key")


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Iterator[ForkingCli]:
    runner = ForkingCli(tmp_path_factory.mktemp("cli-output"))
    yield runner
    runner.close()


@pytest.mark.parametrize("method", METHODS)
def test_cli_refuses_a_bad_allocation_override_with_exit_2(method, config_file, cli):
    """The method's first bounded setting below its bound (or, with none, an unknown key), as a user types it."""
    bad = next(((f, v) for m, f, v in BAD_BOUNDS if m == method), ("no_such_key", 1))
    override = f"allocation.{bad[0]}={bad[1]!r}"
    result = cli.run("train", str(config_file), f"allocation.method={method}", override, cwd=config_file.parent)
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"allocation.{bad[0]}" in errors[0], errors[0]
    assert not (config_file.parent / "out").exists()
