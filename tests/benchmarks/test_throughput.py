"""The throughput benchmark: fixed-length padding and token counting by hand, and a whole run on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.throughput import LENGTH_GROUP, VARIANTS, CountingCollator, FixedLengthCollator, summarize
from tests.cli.helpers import REPO


def test_fixed_length_padding_keeps_every_row_at_the_length_and_counts_the_real_tokens():
    collator = FixedLengthCollator(pad_token_id=0, length=6)
    batch = collator([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [1, 2, 3, 4, 5, 6, 7, 8], "labels": [1, 2, 3, 4, 5, 6, 7, 8]},  # longer: cut to 6
    ])  # fmt: skip
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0], [1, 2, 3, 4, 5, 6]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100, -100], [1, 2, 3, 4, 5, 6]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 6]
    assert collator.useful_tokens == [9]


def test_counting_collator_counts_unpadded_tokens_and_passes_the_batch_through():
    collator = CountingCollator(lambda rows: {"rows": len(rows)})
    assert collator([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5, 6, 7]}]) == {"rows": 2}
    assert collator.useful_tokens == [7]


def test_summary_divides_useful_tokens_by_time():
    result = {"times": [1.0, 3.0], "useful_tokens": [100, 300], "rows": 9, "epoch_tokens": 5000, "peak_mib": 1.0}
    summary = summarize(result)
    assert summary["tokens_per_second"] == 100.0  # 400 tokens in 4 s
    assert summary["epoch_seconds"] == 50.0  # 5,000 tokens at 100 per second
    assert summary["median_step"] == 2.0
    assert summary["useful_per_step"] == 200.0


@pytest.mark.slow
def test_three_layouts_on_a_tiny_model_write_their_section(make_model_dir, tmp_path):
    chats = [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "an answer " * i}]}
        for i in range(1, 25)
    ]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in chats))
    doc, raw = tmp_path / "benchmarks.md", tmp_path / "throughput.json"
    model = str(make_model_dir("llama"))
    command = [sys.executable, "-m", "benchmarks.throughput", "--model", model, "--data", str(data), "--steps", "2",
               "--batch", "2", "--doc", str(doc), "--data-out", str(raw)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(raw.read_text())["results"]
    assert set(results) == set(VARIANTS)
    assert results["pad-to-512"]["rows"] == results["dynamic-padding"]["rows"] == len(chats)
    assert results["packing"]["rows"] < len(chats)  # several short chats share a 512-token row
    # The same tokens whatever the layout: packing neither drops nor pads.
    assert len({result["epoch_tokens"] for result in results.values()}) == 1
    steps = {variant: len(result["times"]) for variant, result in results.items()}
    assert steps == {"pad-to-512": 2, "dynamic-padding": LENGTH_GROUP, "packing": 2}
    assert all(len(result["useful_tokens"]) == steps[variant] for variant, result in results.items())
    text = doc.read_text()
    assert "## Throughput: packing against padding to 512 tokens" in text
    assert all(f"| {variant} |" in text for variant in VARIANTS)
