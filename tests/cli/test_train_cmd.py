"""`ranktune train` end to end on tiny models: the output tree, the logs, and the other verbs on its adapter."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli.helpers import run_cli
from tests.conftest import save_tiny_model

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]


def write_classification_data(folder: Path) -> dict[str, Path]:
    """Sentences whose label follows the sentiment word, in train / validation / test files."""
    files = {}
    for split, count in (("train", 48), ("validation", 12), ("test", 12)):
        lines = []
        for i in range(count):
            word = WORDS[(i * 7 + len(split)) % len(WORDS)]
            label = "pos" if word in WORDS[:3] else "neg"
            lines.append(json.dumps({"text": f"it was {word} {i}", "label": label}))
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("\n".join(lines) + "\n")
    return files


def events_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def write_config(folder: Path, text: str) -> Path:
    path = folder / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    """Trains a tiny BERT classifier once through the console script; returns (output_dir, data, model, result)."""
    tmp_path = tmp_path_factory.mktemp("classification")
    files = write_classification_data(tmp_path)
    model_dir = save_tiny_model(tmp_path / "tiny-bert", "bert", "classification")
    config = write_config(
        tmp_path,
        f"""
        model: {{name_or_path: {model_dir}, task: classification}}
        data: {{train: {files["train"]}, validation: {files["validation"]}, test: {files["test"]}, max_length: 32}}
        lora: {{r: 4, alpha: 8, target_modules: all-linear}}
        training: {{num_train_epochs: 2, per_device_train_batch_size: 8, learning_rate: 1.0e-3, logging_steps: 2}}
        output_dir: {tmp_path / "out"}
        """,
    )
    result = run_cli("train", str(config))
    assert result.returncode == 0, result.stderr
    return tmp_path / "out", files, model_dir, result


def test_output_tree_and_logs(classification_run):
    out, _, _, result = classification_run
    names = {p.name for p in out.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "ranktune.json",
        "metrics.jsonl",
        "config.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
        "checkpoint-6",
        "checkpoint-12",
    } <= names
    assert {n for n in names if n.startswith(".")} == {".ranktune.lock", ".ranktune-run"}  # no staging left
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and adapter_config["base_model_name_or_path"]
    info = json.loads((out / "ranktune.json").read_text())
    assert info["label_names"] == ["neg", "pos"]
    assert {m["rank"] for m in info["modules"]} == {4} and len(info["modules"]) == 13  # 2 layers x 6 + pooler
    assert info["versions"]["peft"] and info["config"]["lora"]["r"] == 4
    assert info["test_after"]["examples"] == 12
    evals = [e for e in events_of(out) if "eval_accuracy" in e]
    assert [e["step"] for e in evals] == [6, 12]  # once per epoch, no duplicate evaluation at the end
    assert info["metrics"]["eval_accuracy"] == evals[-1]["eval_accuracy"]
    events = events_of(out)
    train_logs = [e for e in events if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2, 4, 6, 8, 10, 12]
    assert all(e["tokens_per_second"] > 0 for e in train_logs[1:])
    assert {"learning_rate", "grad_norm"} <= set(train_logs[0])
    assert any("eval_accuracy" in e and "eval_macro_f1" in e for e in events)
    assert "adapter: " in result.stdout and "test: accuracy" in result.stdout


PLAIN_PEFT = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer
adapter, data = sys.argv[1], sys.argv[2]
config = json.load(open(adapter + "/adapter_config.json"))
base = AutoModelForSequenceClassification.from_pretrained(config["base_model_name_or_path"], num_labels=2)
model = PeftModel.from_pretrained(base, adapter).eval()
tokenizer = AutoTokenizer.from_pretrained(adapter)
rows = [json.loads(line) for line in open(data)]
with torch.no_grad():
    batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    predictions = model(**batch).logits.argmax(-1).tolist()
assert "ranktune" not in sys.modules
print(json.dumps(predictions))
"""


def test_plain_peft_predicts_like_ranktune_eval(classification_run, tmp_path):
    out, files, _, _ = classification_run
    result = run_cli(
        "eval", str(out), "--data", str(files["test"]), "--json", "--predictions", str(tmp_path / "p.jsonl")
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    ours = [json.loads(line)["prediction"] for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, str(out), str(files["test"])], capture_output=True, text=True, check=True
    )
    names = ["neg", "pos"]
    assert [names[i] for i in json.loads(plain.stdout)] == ours
    labels = [json.loads(line)["label"] for line in files["test"].read_text().splitlines()]
    assert metrics["accuracy"] == pytest.approx(sum(a == b for a, b in zip(ours, labels, strict=True)) / len(labels))


def test_eval_max_samples_scores_a_seeded_subset(classification_run, tmp_path):
    """--max-samples N scores N rows, the same N every time."""
    out, files, _, _ = classification_run
    first, second = (
        run_cli("eval", str(out), "--data", str(files["test"]), "--max-samples", "3", "--json") for _ in range(2)
    )
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["examples"] == 3 and first.stdout == second.stdout


def test_inspect_table_json_and_plot(classification_run, tmp_path):
    out = classification_run[0]
    table = run_cli("inspect", str(out), "--plot", str(tmp_path / "ranks.png"))
    assert table.returncode == 0, table.stderr
    assert "bert.encoder.layer.1.attention.self.query" in table.stdout
    assert "total: 13 modules, rank 52" in table.stdout
    assert (tmp_path / "ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(run_cli("inspect", str(out), "--json").stdout)
    assert report["total_rank"] == 52
    query = next(m for m in report["modules"] if m["module"].endswith("layer.0.attention.self.query"))
    assert (query["layer"], query["module_type"], query["parameters"]) == (0, "query", 4 * (32 + 32))


def test_existing_adapter_needs_overwrite(classification_run):
    out = classification_run[0]
    result = run_cli("train", str(out.parent / "run.yaml"))
    assert result.returncode == 2 and "--overwrite" in result.stderr


@pytest.fixture
def causal_run(tmp_path, make_model_dir):
    """A tiny llama trained on chat messages; returns (output_dir, model folder)."""
    rows = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
        for w in WORDS * 4
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = make_model_dir("llama")
    config = write_config(
        tmp_path,
        f"""
        model: {{name_or_path: {model_dir}}}
        data: {{train: {tmp_path / "chat.jsonl"}, test: {tmp_path / "chat.jsonl"}, max_length: 64}}
        lora: {{r: 4, target_modules: [q_proj, v_proj, down_proj]}}
        training: {{max_steps: 4, per_device_train_batch_size: 4, learning_rate: 1.0e-2, save_strategy: "no"}}
        output_dir: {tmp_path / "out"}
        """,
    )
    result = run_cli("train", str(config))
    assert result.returncode == 0, result.stderr
    return tmp_path / "out", model_dir


def test_causal_lm_eval_generate_merge(causal_run, tmp_path):
    out, model_dir = causal_run
    info = json.loads((out / "ranktune.json").read_text())
    assert info["data_format"] == "chat"
    assert info["test_after"]["loss"] < info["test_before"]["loss"]
    evaluation = run_cli("eval", str(out), "--data", str(tmp_path / "chat.jsonl"), "--json")
    assert evaluation.returncode == 0, evaluation.stderr
    assert json.loads(evaluation.stdout)["loss"] == pytest.approx(info["test_after"]["loss"], rel=1e-5)
    generated = run_cli("generate", str(out), "--prompt", "say good", "--max-new-tokens", "5")
    assert generated.returncode == 0, generated.stderr
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "say good"}], tokenize=False, add_generation_prompt=True
    )  # trained on chat: generate uses the template
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
    with torch.no_grad():
        expected = peft_model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new_tokens = expected[0, inputs["input_ids"].shape[1] :]
    assert generated.stdout == tokenizer.decode(new_tokens, skip_special_tokens=True) + "\n"

    merged_dir = tmp_path / "merged"
    merged = run_cli("merge", str(out), "--out", str(merged_dir))
    assert merged.returncode == 0, merged.stderr
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    ids = torch.tensor([[5, 17, 30, 41, 9, 60]])
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out).eval()
        torch.testing.assert_close(merged_logits, adapted(ids).logits, rtol=0, atol=1e-5)
