"""The quality study end to end on tiny models: tuning on validation, seeds, test metrics from the saved adapters
(checked against vanilla PEFT), the report's files, and a rerun served from the record cache."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification
from safetensors.torch import load_file
from transformers import AutoTokenizer

from benchmarks import quality
from benchmarks.quality_report import write_report
from benchmarks.quality_study import Profile, Task, methods

WORDS = ["great fun", "awful mess", "fine work", "dull plot", "bright cast", "weak end"]


def _write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _tasks(tmp_path: Path, make_model_dir) -> tuple[Task, Task]:
    reviews = [{"text": f"{WORDS[i % 6]} {i}", "label": "pos" if i % 2 == 0 else "neg"} for i in range(96)]
    pairs = [{"prompt": f"say {WORDS[i % 6]}", "completion": f"{WORDS[(i + 1) % 6]}."} for i in range(80)]
    training = {
        "num_train_epochs": 2,
        "per_device_train_batch_size": 8,
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 5,
    }
    classification = Task(
        name="cls",
        title="tiny BERT, reviews",
        model={"name_or_path": str(make_model_dir("bert", "classification")), "task": "classification"},
        data={
            "train": _write_rows(tmp_path / "train.jsonl", reviews[:64]),
            "validation": _write_rows(tmp_path / "validation.jsonl", reviews[64:80]),
            "test": _write_rows(tmp_path / "test.jsonl", reviews[80:]),
            "max_length": 32,
        },
        training=training,
        learning_rates=(1e-2,),
        metric="accuracy",
        higher_is_better=True,
        second_metric="macro_f1",
        saliency_batches=2,
    )
    causal = Task(
        name="lm",
        title="tiny llama, pairs",
        model={"name_or_path": str(make_model_dir("llama")), "task": "causal_lm"},
        data={
            "train": _write_rows(tmp_path / "pairs.jsonl", pairs[:48]),
            "validation": _write_rows(tmp_path / "pairs-val.jsonl", pairs[48:64]),
            "test": _write_rows(tmp_path / "pairs-test.jsonl", pairs[64:]),
            "max_length": 32,
            "format": "prompt_completion",
        },
        training=training,
        learning_rates=(1e-2,),
        metric="loss",
        higher_is_better=False,
        second_metric="perplexity",
        saliency_batches=2,
    )
    return classification, causal


def _vanilla_peft_accuracy(adapter_dir: str, rows: list[dict]) -> float:
    """Accuracy of the adapter loaded by PEFT alone, example by example (labels in sorted order: neg, pos)."""
    model = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    names = sorted({row["label"] for row in rows})
    right = 0
    with torch.no_grad():
        for row in rows:
            logits = model(**tokenizer(row["text"], return_tensors="pt")).logits  # (1, 2)
            right += names[int(logits.argmax())] == row["label"]
    return right / len(rows)


@pytest.mark.slow
def test_study_tunes_on_validation_tests_the_chosen_runs_and_reports(tmp_path, make_model_dir, monkeypatch):
    tasks = _tasks(tmp_path, make_model_dir)
    chosen_methods = tuple(
        m for m in methods(l1ra_lambdas=(0.3, 1.0)) if m.name in ("lora-r8", "l1ra-ranks", "hetero-static")
    )
    profile = Profile("test", tasks, chosen_methods, seeds=(0, 1))
    study = quality.Study(profile, tmp_path / "work")
    selections = [study.tune_and_repeat(task, method) for task in tasks for method in chosen_methods]
    out = tmp_path / "docs" / "results.md"
    baselines = {task.name: study.baseline(task) for task in tasks}
    assert baselines["cls"]["accuracy"] == 0.5  # train is half pos, half neg; so is test, whichever label is chosen
    assert baselines["lm"]["loss"] > 0 and baselines["lm"]["tokens"] > 0
    written = write_report(profile, selections, study.records, baselines, out)

    figures = {f"{task.name}-quality.png" for task in tasks}
    figures |= {f"{task.name}-{name}.png" for task in tasks for name in ("l1ra-ranks", "hetero-static")}
    assert {path.relative_to(out.parent).as_posix() for path in written} == {
        "results.md",
        "data/results.json",
        *(f"results/{name}" for name in figures),
    }
    assert {p.name for p in (out.parent / "results").iterdir()} == figures

    text = out.read_text()
    records = study.records
    for selection, task in zip(selections, [t for t in tasks for _ in chosen_methods], strict=True):
        tuning = [records[key] for key in selection["tuning"]]
        assert len(tuning) == 2  # one learning rate x two knob values
        sign = 1 if task.higher_is_better else -1
        best = max(tuning, key=lambda r: sign * r["validation"][task.metric])
        assert (selection["chosen"]["learning_rate"], selection["chosen"]["knob_value"]) == (
            best["learning_rate"],
            best["knob_value"],
        )
        final = [records[key] for key in selection["final"]]
        assert [r["seed"] for r in final] == [0, 1] and final[0]["id"] == best["id"]
        assert all(r["test"] is None for r in tuning if r["id"] != best["id"])  # the test split is read for the chosen
        values = [r["test"][task.metric] for r in final]
        assert f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}" in text
        if task.name == "cls":
            rows = [json.loads(line) for line in Path(task.data["test"]).read_text().splitlines()]
            for record in final:
                assert record["test"]["accuracy"] == pytest.approx(_vanilla_peft_accuracy(record["adapter_dir"], rows))
    saved = json.loads((out.parent / "data" / "results.json").read_text())
    assert len(saved["records"]) == len({key for s in selections for key in s["tuning"] + s["final"]}) == 18

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(quality, "train_one", no_training)
    again = quality.Study(profile, tmp_path / "work")
    assert [again.tune_and_repeat(task, method) for task in tasks for method in chosen_methods] == selections


@pytest.mark.slow
def test_every_other_method_runs_end_to_end_and_reports(tmp_path, make_model_dir):
    classification, _ = _tasks(tmp_path, make_model_dir)
    task = dataclasses.replace(classification, knobs_tuned=False)
    others = tuple(m for m in methods(l1ra_lambdas=(0.3, 1.0)) if m.name not in ("lora-r8", "l1ra-ranks",
                                                                                "hetero-static"))  # fmt: skip
    assert {m.name for m in others} == {"lora-r4", "lora-r16", "l1ra-params", "adalora", "hetero-dynamic",
                                        "hetero-shortcuts"}  # fmt: skip
    profile = Profile("test", (task,), others, seeds=(0,))
    study = quality.Study(profile, tmp_path / "work")
    selections = [study.tune_and_repeat(task, method) for method in others]
    baselines = {task.name: study.baseline(task)}
    write_report(profile, selections, study.records, baselines, tmp_path / "docs" / "results.md")
    records = [study.records[s["final"][0]] for s in selections]
    assert all(0.0 <= r["test"]["accuracy"] <= 1.0 and r["adapter_parameters"] > 0 for r in records)
    for record in records:  # every method trained its adapter away from the zero-initialised B
        tensors = load_file(str(Path(record["adapter_dir"]) / "adapter_model.safetensors"))
        assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k), record["method"]
    by_method = {s["method"]: study.records[s["final"][0]] for s in selections}
    assert by_method["hetero-shortcuts"]["shortcuts"] >= 1  # the connections it kept are in the adapter
    assert by_method["lora-r16"]["adapter_parameters"] == 4 * by_method["lora-r4"]["adapter_parameters"]
