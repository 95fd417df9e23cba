"""Real 2-process FSDP2 runs of `ranktune train` on CPU (gloo), one per allocation method.

The base model is sharded (its weights are DTensors on both processes) and the adapter is kept whole
(`training/sharding.py`). Each test checks that both processes hold bit-identical adapter tensors (masks and gates
included) after every optimizer step, and that the exported adapter matches a reference run: one process with the
same global batch (or, for EVA, whose calibration batches are shared out per process, the same run under DDP).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import save_tiny_model

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "benchmarks" / "fsdp_on_cpu.py"
FSDP = ["training.fsdp=true", "training.fsdp_config={fsdp_version: 2}"]

METHODS = {
    "none": ("allocation={method: none}",),
    "l1ra": ("allocation={method: l1ra, l1ra_lambda: 3.0, eta_c: 0.05, rank_update_ratio: 0.125}",),
    "adalora": ("allocation={method: adalora, init_r: 6, target_r: 3, tinit: 3, tfinal: 4, deltaT: 2}",),
    "hetero": (
        "allocation={method: hetero, heuristic: grad_norm, every: 4, keep: 0.5, batches: 3, shortcuts_mode: combined}",
        "shortcuts.r=4",
    ),
    "eva": ("allocation={method: eva, rho: 2.0, batches: 4}",),
    "gradient": ("allocation={method: gradient, rho: 2.0, batches: 4}",),
    "embedding": ("allocation={method: none}", "lora.target_modules=[q_proj, v_proj, embed_tokens]"),
    "gradient-l1ra": (
        "allocation={method: l1ra, l1ra_lambda: 3.0, eta_c: 0.05, rank_update_ratio: 0.125, "
        "start: {method: gradient, rho: 2.0, batches: 4}}",
    ),
}


def write_run(folder: Path, model_dir: Path) -> Path:
    """Text rows and a config: tiny llama, LoRA r 4 on every linear layer, 16 steps, sequential batches."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["quick", "slow", "red", "blue"]
    rows = [{"text": f"the {words[i % 4]} fox jumps over the lazy dog number {i} and runs away"} for i in range(160)]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = {
        "model": {"name_or_path": str(model_dir), "task": "causal_lm"},
        "data": {"train": str(folder / "train.jsonl"), "text_column": "text", "max_length": 32},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "training": {
            "max_steps": 16,
            "per_device_train_batch_size": 4,
            "learning_rate": 0.01,
            "logging_steps": 4,
            "save_strategy": "no",
            "train_sampling_strategy": "sequential",
            "disable_tqdm": True,
            "use_cpu": True,
        },
    }
    path = folder / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def train(
    config: Path, out: Path, *overrides: str, processes: int = 1, port: int = 29600, env: dict | None = None, code=0
) -> Path:
    """Runs `ranktune train` through the launcher, expecting exit code `code`; returns the folder of its
    per-process digests."""
    digests = out.with_name(out.name + "-digests")
    digests.mkdir(parents=True, exist_ok=True)
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    command = [*launch, str(LAUNCHER), str(digests), "train", str(config), f"output_dir={out}", *overrides]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    assert result.returncode == code, result.stderr[-4000:]
    return digests


def read_digests(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / f"digest-{rank}.jsonl").read_text().splitlines()]


def assert_same_adapter(left: Path, right: Path, atol: float) -> None:
    """The same tensors (names and shapes: the same ranks and modules) and values within atol."""
    for name in ("adapter_model.safetensors", "shortcuts.safetensors"):
        if not (left / name).exists():
            assert not (right / name).exists()
            continue
        a, b = load_file(left / name), load_file(right / name)
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_processes_agree_every_step_and_match_the_reference(method, make_model_dir, tmp_path):
    model_dir = make_model_dir("llama")
    config = write_run(tmp_path, model_dir)
    port = 29600 + list(METHODS).index(method)
    digests = train(config, tmp_path / "fsdp", *METHODS[method], *FSDP, processes=2, port=port)

    rank0, rank1 = read_digests(digests, 0), read_digests(digests, 1)
    assert [row["step"] for row in rank0] == list(range(1, 17))
    assert rank0 == rank1  # every adapter tensor, mask and gate bit-identical on both processes after every step
    assert rank0[0]["sharded"] > 0  # the base really was sharded (DTensors), not trained as DDP
    assert rank0[0]["digest"] and not any(row["sharded_adapter"] for row in rank0)  # the adapter stayed whole

    if method == "eva":  # calibration batches are shared out per process: DDP with the same split is the reference
        train(config, tmp_path / "reference", *METHODS[method], processes=2, port=port + 20)
        assert_same_adapter(tmp_path / "fsdp", tmp_path / "reference", atol=1e-6)
    else:
        train(config, tmp_path / "reference", *METHODS[method], "training.per_device_train_batch_size=8")
        # The same global batch in one process: the same decisions (tensor shapes), and the weights to the
        # tolerance the order of the gradient reductions allows over 16 steps at learning rate 0.01.
        assert_same_adapter(tmp_path / "fsdp", tmp_path / "reference", atol=5e-5)

    if method != "hetero":  # vanilla PEFT reads the export (shortcut connections are outside PEFT)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        with torch.no_grad():
            fsdp = PeftModel.from_pretrained(base, tmp_path / "fsdp").eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            reference = PeftModel.from_pretrained(base, tmp_path / "reference").eval()(ids).logits
        torch.testing.assert_close(fsdp, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["l1ra", "hetero"])
def test_an_interrupted_fsdp2_run_resumes_to_the_same_adapter(method, make_model_dir, tmp_path):
    config = write_run(tmp_path, make_model_dir("llama"))
    saving = ["training.save_strategy=steps", "training.save_steps=8"]
    port = 29640 + ["l1ra", "hetero"].index(method)
    train(config, tmp_path / "whole", *METHODS[method], *FSDP, *saving, processes=2, port=port)

    interrupted = tmp_path / "interrupted"  # the run as a kill after step 8's checkpoint leaves it
    shutil.copytree(tmp_path / "whole" / "checkpoint-8", interrupted / "checkpoint-8")
    for name in ("config.yaml", "metrics.jsonl", "rank_history.jsonl", "reallocation_history.jsonl"):
        if (tmp_path / "whole" / name).exists():
            shutil.copy(tmp_path / "whole" / name, interrupted / name)
    train(config, interrupted, *METHODS[method], *FSDP, *saving, "--resume", processes=2, port=port + 10)
    assert_same_adapter(tmp_path / "whole", interrupted, atol=0)


def test_accelerate_launch_with_the_example_config_runs_fsdp2(make_model_dir, tmp_path):
    """examples/accelerate/fsdp2.yaml (mixed precision off: this is a CPU) gives the FSDP2 run `training.fsdp`
    gives, without any training.fsdp key."""
    config = write_run(tmp_path, make_model_dir("llama"))
    digests = tmp_path / "accelerate-digests"
    digests.mkdir()
    example = str(REPO / "examples" / "accelerate" / "fsdp2.yaml")
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", example,
        "--mixed_precision", "no", "--main_process_port", "29660",
    ]  # fmt: skip
    overrides = [f"output_dir={tmp_path / 'accelerate'}", *METHODS["l1ra"]]
    command = [*launch, str(LAUNCHER), str(digests), "train", str(config), *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = read_digests(digests, 0), read_digests(digests, 1)
    assert rank0 == rank1 and rank0[0]["sharded"] > 0
    train(config, tmp_path / "torchrun", *METHODS["l1ra"], *FSDP, processes=2, port=29661)
    assert_same_adapter(tmp_path / "accelerate", tmp_path / "torchrun", atol=0)


def test_fsdp2_with_gradient_accumulation_matches_one_process(make_model_dir, tmp_path):
    """2 processes x 2 rows x 2 accumulated micro-batches = one process's batch of 8: the gradients are averaged once
    per window, after its last micro-batch."""
    config = write_run(tmp_path, make_model_dir("llama"))
    accumulate = ["training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2"]
    digests = train(config, tmp_path / "fsdp", *METHODS["l1ra"], *FSDP, *accumulate, processes=2, port=29670)
    assert read_digests(digests, 0) == read_digests(digests, 1)
    train(config, tmp_path / "reference", *METHODS["l1ra"], "training.per_device_train_batch_size=8")
    assert_same_adapter(tmp_path / "fsdp", tmp_path / "reference", atol=5e-5)


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(make_model_dir, tmp_path):
    """SIGTERM reaches process 1 alone as step 6 begins: both processes stop after step 6 and save its checkpoint
    together (one stopping alone would leave the other waiting in step 7's all-gathers), and --resume ends where the
    uninterrupted run ends."""
    config = write_run(tmp_path, make_model_dir("llama"))
    train(config, tmp_path / "whole", *METHODS["l1ra"], *FSDP, processes=2, port=29680)
    interrupted = tmp_path / "interrupted"
    signal = {"RANKTUNE_SIGTERM_AT": "1:6"}
    # each process exits with 130 (interrupted, checkpoint saved), which torchrun reports as its own failure: 1
    digests = train(config, interrupted, *METHODS["l1ra"], *FSDP, processes=2, port=29681, env=signal, code=1)
    assert [row["step"] for row in read_digests(digests, 0)] == [1, 2, 3, 4, 5, 6]
    assert read_digests(digests, 0) == read_digests(digests, 1)
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == ["checkpoint-6"]
    train(config, interrupted, *METHODS["l1ra"], *FSDP, "--resume", processes=2, port=29682)
    assert_same_adapter(tmp_path / "whole", interrupted, atol=0)


def test_fsdp2_trains_a_bert_classifier_like_ddp(tmp_path):
    """An encoder with a classification head under FSDP2 (L1RA): BERT lists its embeddings among the layers to
    wrap, which accelerate then shards a second time (it failed before `sharding.layers_to_wrap`); the head, trained
    in full, is kept whole like the adapter; the processes agree after every step and end as under DDP."""
    # no dropout, so that nothing in the comparison is random
    model_dir = save_tiny_model(
        tmp_path / "bert", "bert", "classification", hidden_dropout_prob=0, attention_probs_dropout_prob=0
    )
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    rows = [{"text": f"it was {words[i % 6]} {i}", "label": "pos" if i % 6 < 3 else "neg"} for i in range(120)]
    config = json.loads(write_run(tmp_path, model_dir).read_text())
    (tmp_path / "labelled.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config["model"]["task"] = "classification"
    config["data"] = {"train": str(tmp_path / "labelled.jsonl"), "max_length": 16}
    path = tmp_path / "bert.yaml"
    path.write_text(json.dumps(config))
    digests = train(path, tmp_path / "fsdp", *METHODS["l1ra"], *FSDP, processes=2, port=29690)
    rank0, rank1 = read_digests(digests, 0), read_digests(digests, 1)
    assert rank0 == rank1 and rank0[0]["sharded"] > 0 and not any(row["sharded_adapter"] for row in rank0)
    # The reference is DDP: this tiny random encoder's gradients are so small that Adam's first steps (g / (|g| +
    # eps)) turn the reduction-order differences of a one-process run into visible ones.
    train(path, tmp_path / "reference", *METHODS["l1ra"], processes=2, port=29691)
    assert_same_adapter(tmp_path / "fsdp", tmp_path / "reference", atol=1e-6)
