"""The training run through the Python API: quantized bases, resume after a signal, packing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from safetensors.torch import load_file

from ranktune.config import validate_config
from ranktune.training import train
from tests.conftest import save_tiny_model
from tests.training.resume import assert_resume_is_exact, checkpoint_epoch, over_two_epochs

TEXT = "To be, or not to be, that is the question: whether tis nobler in the mind to suffer. " * 6


def text_config(model_dir: Path, tmp_path: Path, **training) -> dict:
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT[i:] + TEXT[:i]}) + "\n" for i in range(0, 120, 6)))
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(data), "max_length": 32, "format": "text"},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {"per_device_train_batch_size": 4, "learning_rate": 5e-3, "save_strategy": "no", **training},
        "output_dir": str(tmp_path / "out"),
    }


def test_quantized_4bit_base_trains_and_saves(tmp_path):
    pytest.importorskip("bitsandbytes")
    # bitsandbytes 0.50's evaluation path on CPUs with AVX512-BF16 repacks 4-bit weights in blocks: it needs
    # in_features of at least one quantization block (64) and out_features a multiple of 32; real models have both.
    model_dir = save_tiny_model(tmp_path / "tiny-llama-64", "llama", hidden_size=64, intermediate_size=128, head_dim=16)
    config = text_config(model_dir, tmp_path, max_steps=3)
    config["model"]["quantization"] = "4bit"
    result = train(validate_config(config))
    tensors = load_file(str(result.output_dir / "adapter_model.safetensors"))
    assert sorted(k for k in tensors if "lora_A" in k) == [
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_A.weight" for i in range(2) for m in ("q_proj", "v_proj")
    ]
    assert result.info["config"]["model"]["quantization"] == "4bit"
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained, not the zero init


RESUMABLE = """
import sys
from ranktune.cli.main import main
sys.exit(main(["train", sys.argv[1]] + sys.argv[2:]))
"""


def test_sigterm_saves_a_checkpoint_and_resume_finishes(make_model_dir, tmp_path):
    import yaml

    config = text_config(
        make_model_dir("llama"), tmp_path, max_steps=100000, logging_steps=1, save_strategy="steps", save_steps=100000
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen([sys.executable, "-c", RESUMABLE, str(path)], stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    checkpoints = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and "--resume" in stderr
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    stopped_at = int(checkpoints[0].name.split("-")[1])

    finish = subprocess.run(
        [sys.executable, "-c", RESUMABLE, str(path), "--resume", f"training.max_steps={stopped_at + 2}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finish.returncode == 0, finish.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]
    assert (tmp_path / "out" / "adapter_config.json").exists()


def test_interrupted_and_resumed_lora_run_gives_the_same_adapter(make_model_dir, tmp_path):
    """Plain LoRA with dropout, from checkpoints in the second epoch: mid-way (step 12), at its start (step 8, saved
    before the epoch's evaluation) and where a SIGTERM stopped the run (step 11)."""
    model_dir = make_model_dir("llama")
    for name in "ab":
        (tmp_path / name).mkdir()
    straight, checkpointed = (over_two_epochs(text_config(model_dir, tmp_path / name, seed=3)) for name in "ab")
    assert_resume_is_exact(straight, checkpointed, save_steps=4, resume_steps=[12, 8], stop_after=11)
    assert checkpoint_epoch(tmp_path / "b" / "out", 12) == 1.5


def test_the_trainer_runs_our_callbacks_in_order(make_model_dir, tmp_path):
    """The allocation callback and the metrics logger come before the Trainer's own callbacks (the values they add
    to a log event must reach the console and metrics.jsonl); the signal handler and the shortcut checkpoints after;
    and each checkpoint writer is told the folder a resumed run reads from."""
    from transformers.trainer_callback import DefaultFlowCallback

    from ranktune.allocation.callback import AllocationCallback
    from ranktune.data import build_collator
    from ranktune.training.arguments import build_training_arguments
    from ranktune.training.callbacks import MetricsLogger, ShortcutCheckpoints, StopOnSignal
    from ranktune.training.run import build_model_and_adapter, build_trainer, prepare_run

    config = text_config(make_model_dir("llama"), tmp_path, max_steps=2)
    config["allocation"] = {"method": "hetero", "keep": 0.5, "batches": 1}
    config["shortcuts"] = {"r": 2, "kinds": ["residual1"]}
    config = validate_config(config)
    run = prepare_run(config)
    args = build_training_arguments(config, tmp_path / "out", has_validation=False)
    collator = build_collator(run.tokenizer, "causal_lm")
    adapted = build_model_and_adapter(config, run, args, collator, tmp_path / "out")
    session = build_trainer(config, run, adapted, args, collator, tmp_path / "out")
    kinds = [type(callback) for callback in session.trainer.callback_handler.callbacks]
    assert kinds[:3] == [AllocationCallback, MetricsLogger, DefaultFlowCallback]
    stop = kinds.index(StopOnSignal)
    assert kinds[stop + 1] is ShortcutCheckpoints and stop > 2  # the Trainer adds its progress bar after them
    assert session.stopper is session.trainer.callback_handler.callbacks[stop]
    assert session.trainer.callback_handler.callbacks[0].strategy is adapted.strategy
    writers = session.trainer.checkpoint_writers()
    assert [type(w) for w in writers] == [AllocationCallback, ShortcutCheckpoints]
    folder = tmp_path / "checkpoint-1"
    with mock.patch("transformers.Trainer.train") as trainer_train:
        for given in (str(folder), folder):  # a Path as the Trainer takes it, too
            session.trainer.train(resume_from_checkpoint=given)
            assert trainer_train.call_args.kwargs["resume_from_checkpoint"] == str(folder)
            assert [w.resume_from for w in writers] == [str(folder)] * 2
        session.trainer.train()  # a later fresh start reads no checkpoint
        assert trainer_train.call_args.kwargs["resume_from_checkpoint"] is None
        assert [w.resume_from for w in writers] == [None, None]
