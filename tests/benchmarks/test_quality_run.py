"""The quality study end to end on tiny models, in worker processes as `python -m benchmarks.quality` runs it:
tuning on validation, paired seeds, test metrics from the saved adapters (checked against vanilla PEFT), the report,
and a rerun that trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoTokenizer

from benchmarks import quality
from benchmarks.quality_report import write_report
from benchmarks.quality_study import Profile, Task, _training, methods, run_id

WORDS = ["great fun", "awful mess", "fine work", "dull plot", "bright cast", "weak end"]


def _write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _classification(tmp_path: Path, make_model_dir) -> Task:
    reviews = [{"text": f"{WORDS[i % 6]} {i}", "label": "pos" if i % 2 == 0 else "neg"} for i in range(96)]
    return Task(
        name="cls",
        title="tiny BERT, reviews",
        model={"name_or_path": str(make_model_dir("bert", "classification")), "task": "classification"},
        data={
            "train": _write_rows(tmp_path / "train.jsonl", reviews[:64]),
            "validation": _write_rows(tmp_path / "validation.jsonl", reviews[64:80]),
            "max_length": 32,
        },
        test=_write_rows(tmp_path / "test.jsonl", reviews[80:]),
        training=_training(4, 8, 2, 8),
        learning_rates=(5e-3, 1e-2, 2e-2),
        metric="accuracy",
        higher_is_better=True,
        second_metric="macro_f1",
    )


def _vanilla_peft_accuracy(adapter_dir: Path, rows: list[dict]) -> float:
    """Accuracy of the adapter loaded by PEFT alone, example by example (labels in sorted order: neg, pos)."""
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(adapter_dir), num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    names = sorted({row["label"] for row in rows})
    right = 0
    with torch.no_grad():
        for row in rows:
            logits = model(**tokenizer(row["text"], return_tensors="pt")).logits  # (1, 2)
            right += names[int(logits.argmax())] == row["label"]
    return right / len(rows)


@pytest.mark.slow
def test_study_tunes_on_validation_tests_every_run_and_reports(tmp_path, make_model_dir):
    task = _classification(tmp_path, make_model_dir)
    chosen = tuple(m for m in methods() if m.name in ("lora-r1", "lora-r2", "gradient-r2"))
    profile = Profile("test", (task,), chosen, seeds=(0, 1))
    store = quality.RecordStore(tmp_path / "records.jsonl")
    study = quality.Study(profile, tmp_path / "work", store, keep_adapters=True)
    quality.run_study(study, jobs=2)
    records = store.load()

    rows = [json.loads(line) for line in Path(task.test).read_text().splitlines()]
    for method in chosen:
        assert not quality.pending(task, method, profile.seeds, records)
        selection = quality.select(task, method, 0, records)
        tuning = {lr: records[run_id(task, method, lr, 0)]["validation"]["accuracy"] for lr in selection.grid}
        assert tuning[selection.chosen] == max(tuning.values())  # the first best on validation is chosen
        for seed in profile.seeds:
            record = records[run_id(task, method, selection.chosen, seed)]
            assert [step for step, _ in record["history"]] == [2, 4]  # validation every 2 of the 4 steps
            assert record["history"][-1][1] == record["validation"]["accuracy"]
            adapter = tmp_path / "work" / task.name / method.name / f"{record['id']}-seed{seed}"
            assert record["test"]["accuracy"] == pytest.approx(_vanilla_peft_accuracy(adapter, rows))
    by_method = {r["method"]: r for r in records.values()}
    assert by_method["lora-r2"]["adapter_parameters"] == 2 * by_method["lora-r1"]["adapter_parameters"]
    assert by_method["gradient-r2"]["adapter_parameters"] <= by_method["lora-r2"]["adapter_parameters"]

    out = tmp_path / "docs" / "results.md"
    written = write_report(profile, records, out)
    assert {p.relative_to(out.parent).as_posix() for p in written} == {"results.md", "results/cls.png"}
    text = out.read_text()
    assert "most common label scores 0.5000 test accuracy" in text  # train and test are half pos, half neg
    row = next(line for line in text.splitlines() if line.startswith("| gradient (ranks + init) at r 2 | r 2 |"))
    assert row.count("(p ") == 2  # paired against LoRA r 2 and against LoRA's curve
    lines_before = store.path.read_text()
    quality.run_study(quality.Study(profile, tmp_path / "work", store), jobs=1)
    assert store.path.read_text() == lines_before  # every run came from the records
