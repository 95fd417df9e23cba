"""Real 2-process DeepSpeed ZeRO-2 / ZeRO-3 runs of `ranktune train` on CPU (DeepSpeed's CPU accelerator, gloo).

Opt-in: these run only where the deepspeed package is installed (`make test-deepspeed` builds an environment with
it; the first run compiles DeepSpeed's CPU communication op, about 7 minutes on 2 cores). Each run's exported
adapter is compared with the same run without DeepSpeed: one process with the same global batch, or, for EVA, whose
calibration batches are shared out per process, 2-process data parallel.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.distributed.test_fsdp import assert_same_adapter, train, write_run

pytest.importorskip("deepspeed", reason="DeepSpeed tests need the deepspeed package: make test-deepspeed")

ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
EVA = "allocation={method: eva, rho: 2.0, batches: 4}"
GRADIENT = "allocation={method: gradient, rho: 2.0, batches: 4}"
CHECKPOINTS = ("training.save_strategy=steps", "training.save_steps=4")


def zero(stage: int) -> str:
    return f"training.deepspeed={{zero_optimization: {{stage: {stage}}}}}"


def logits(model_dir: Path, adapter: Path) -> torch.Tensor:
    """The adapter's logits on a fixed prompt, loaded by vanilla PEFT."""
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        return PeftModel.from_pretrained(base, adapter).eval()(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits


@pytest.mark.parametrize(
    ("stage", "allocation"),
    [(2, "allocation={method: none}"), (3, "allocation={method: none}"), (2, GRADIENT), (3, GRADIENT), (3, EVA)],
    ids=["zero2-none", "zero3-none", "zero2-gradient", "zero3-gradient", "zero3-eva"],
)
def test_zero_trains_the_adapter_the_reference_trains(stage, allocation, make_model_dir, tmp_path):
    model_dir = make_model_dir("llama")
    config = write_run(tmp_path, model_dir)
    rows = (tmp_path / "train.jsonl").read_text().splitlines()[:20]
    (tmp_path / "test.jsonl").write_text("\n".join(rows) + "\n")
    test = f"data.test={tmp_path / 'test.jsonl'}"  # under ZeRO-3 every process takes part in scoring it
    port = 29700 + 10 * stage + len(allocation) % 10
    train(config, tmp_path / "zero", allocation, zero(stage), test, processes=2, port=port, env=ENV)

    if allocation == EVA:
        train(config, tmp_path / "reference", allocation, test, processes=2, port=port + 50, env=ENV)
    else:
        train(config, tmp_path / "reference", allocation, test, "training.per_device_train_batch_size=8", env=ENV)
    # The same ranks (tensor shapes) and weights to the tolerance the order of the gradient reductions allows over
    # 16 steps at learning rate 0.01 (measured: at most 2e-5, the gradient method's init against one process).
    assert_same_adapter(tmp_path / "zero", tmp_path / "reference", atol=5e-5)
    torch.testing.assert_close(
        logits(model_dir, tmp_path / "zero"), logits(model_dir, tmp_path / "reference"), rtol=0, atol=1e-4
    )
    scored = [json.loads((tmp_path / run / "ranktune.json").read_text()) for run in ("zero", "reference")]
    for when in ("test_before", "test_after"):
        assert scored[0][when]["loss"] == pytest.approx(scored[1][when]["loss"], abs=1e-4)
    assert scored[0]["test_after"]["loss"] < scored[0]["test_before"]["loss"]


class WritesAFile:
    """A pickle that, if unpickled without weights_only, creates a file: the proof that loading ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_resumes_exactly_and_refuses_a_checkpoint_that_would_run_code(stage, make_model_dir, tmp_path):
    model_dir = make_model_dir("llama")
    config = write_run(tmp_path, model_dir)
    run = (GRADIENT, zero(stage), *CHECKPOINTS)
    interrupted = tmp_path / "interrupted"
    # Process 1 receives a SIGTERM as step 9 begins: both stop after it with checkpoint-9 (torchrun exits 1).
    train(
        config,
        interrupted,
        *run,
        processes=2,
        port=29791 + 10 * stage,
        env={**ENV, "RANKTUNE_SIGTERM_AT": "1:9"},
        code=1,
    )
    assert (interrupted / "checkpoint-9" / "global_step9").is_dir()
    assert not (interrupted / "adapter_config.json").exists()

    hostile = tmp_path / "hostile"
    shutil.copytree(interrupted, hostile)
    marker = tmp_path / "code-ran"
    optimizer_state = next((hostile / "checkpoint-9" / "global_step9").glob("*rank_0*optim_states.pt"))
    with optimizer_state.open("wb") as stream:
        pickle.dump({"optimizer_state_dict": WritesAFile(marker)}, stream)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29792 + 10 * stage),
    ]
    command += ["-m", "ranktune", "train", str(config), f"output_dir={hostile}", *run, "--resume"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, **ENV})
    assert refused.returncode != 0 and not marker.exists()
    assert "holds pickled objects other than tensors and DeepSpeed's own state" in refused.stderr
    assert not (hostile / "adapter_config.json").exists()

    train(config, interrupted, *run, "--resume", processes=2, port=29793 + 10 * stage, env=ENV)
    train(config, tmp_path / "uninterrupted", *run, processes=2, port=29794 + 10 * stage, env=ENV)
    assert_same_adapter(interrupted, tmp_path / "uninterrupted", atol=0.0)
