"""`ranktune train`: config → data → model + LoRA → Trainer → adapter, metrics and reports in output_dir."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ranktune.adapters.layout import RANK_HISTORY, RUN_INFO
from ranktune.adapters.shortcuts import find_shortcuts
from ranktune.allocation.plan import read_plan
from ranktune.config import DataConfig, RunConfig
from ranktune.data import build_collator, detect_format, load_splits, prepare_causal_lm, prepare_classification
from ranktune.errors import RanktuneError, UserInputError
from ranktune.evaluation import evaluate, format_metrics, trainer_classification_metrics
from ranktune.export import write_adapter
from ranktune.models import load_base_model, load_tokenizer, resolve_model_path
from ranktune.models.loading import load_model_config
from ranktune.training.allocation import attach_adapter
from ranktune.training.arguments import build_training_arguments, validate_training_arguments
from ranktune.training.callbacks import MetricsLogger, ShortcutCheckpoints, StopOnSignal
from ranktune.training.checkpoints import checkpoints_newest_first, resume_message, select_resume_checkpoint
from ranktune.training.output_lock import output_dir_lock
from ranktune.training.outputs import (
    METRICS_LOG,
    EarlierRun,
    check_output_dir,
    prepare_output_dir,
    run_info,
    save_resolved_config,
)
from ranktune.training.trainer import RanktuneTrainer


class TrainingInterrupted(RanktuneError):
    """Stopped by Ctrl-C or SIGTERM after saving a checkpoint."""

    exit_code = 130


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    metrics: dict[str, Any]
    test_before: dict[str, Any] | None = None
    test_after: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _launched_as_main() -> bool:
    """Whether this is the main process of a torchrun / accelerate launch (or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def _log(message: str) -> None:
    print(f"[ranktune] {message}", file=sys.stderr, flush=True)


def _resolve_data_paths(data: DataConfig) -> DataConfig:
    from ranktune import assets

    resolved = {
        key: assets.resolve(getattr(data, key)) for key in ("train", "validation", "test") if getattr(data, key)
    }
    return data.model_copy(update=resolved)


def _prepare_datasets(config: RunConfig, data: DataConfig, tokenizer, model_type: str):
    """Tokenized splits, the label names (classification) and the data format that was used."""
    splits = load_splits(data)
    if config.model.task == "classification":
        prepared, label_names = prepare_classification(splits, tokenizer, data, num_labels=config.model.num_labels)
        return prepared, label_names, "classification"
    data_format = detect_format(splits["train"], data)
    data = data.model_copy(update={"format": data_format})
    return prepare_causal_lm(splits, tokenizer, data, model_type=model_type), None, data_format


def _final_validation(trainer: Trainer, has_validation: bool) -> dict[str, Any]:
    """Validation metrics at the last step: the Trainer's own if it evaluated there, else one evaluation now."""
    if not has_validation:
        return {}
    last = trainer.state.log_history[-2:]  # the final eval (if any) is logged just before the train summary
    for record in last:
        if "eval_loss" in record and record.get("step") == trainer.state.global_step:
            return {k: v for k, v in record.items() if k.startswith("eval_")}
    return trainer.evaluate()


@dataclass
class PreparedRun:
    """The tokenizer, tokenized splits and base model of a run, before any adapter."""

    model_path: str
    tokenizer: PreTrainedTokenizerBase
    datasets: dict[str, Any]
    label_names: list[str] | None
    data_format: str
    model: PreTrainedModel


def prepare_run(config: RunConfig) -> PreparedRun:
    """Seeds, then loads the tokenizer, the data (tokenized) and the base model of a config.

    Raises:
        UserInputError: bad data, model path or columns.
    """
    set_seed(int(config.training.get("seed", 42)))  # the new head and LoRA's A are drawn before the Trainer seeds
    model_path = resolve_model_path(config.model.name_or_path)
    data = _resolve_data_paths(config.data)
    pretrained_config = load_model_config(model_path, config.model)  # read once: the tokenizer's EOS, the model type
    tokenizer = load_tokenizer(model_path, config.model, pretrained_config)
    _log(f"preparing data from {data.train}")
    datasets, label_names, data_format = _prepare_datasets(config, data, tokenizer, pretrained_config.model_type)
    _log(f"loading {config.model.name_or_path} ({config.model.task})")
    model = load_base_model(model_path, config.model, label_names=label_names, pad_token_id=tokenizer.pad_token_id)
    return PreparedRun(model_path, tokenizer, datasets, label_names, data_format, model)


def train(config: RunConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Runs one training job end to end and writes the adapter and reports into `config.output_dir`.

    The run holds output_dir's lock throughout. An earlier run's results stay in place until this one has written
    its adapter; if this run fails, they are put back (see `outputs.EarlierRun`).

    Raises:
        UserInputError: bad config, data or paths, or another run is using output_dir.
        TrainingInterrupted: a signal stopped training; a checkpoint was saved.
    """
    validate_training_arguments(config)  # what TrainingArguments refuses, before anything is loaded or written
    main_process = _launched_as_main()
    output_dir = check_output_dir(config.output_dir)
    with output_dir_lock(output_dir, enabled=main_process):
        if main_process:
            prepare_output_dir(output_dir, resume, overwrite)
        earlier = EarlierRun(output_dir, resume, main_process)
        try:
            result = _train_in(config, output_dir, resume, earlier)
        except TrainingInterrupted:
            raise  # resumable: its checkpoints and the earlier run's logs both stay
        except BaseException:
            if not earlier.restore():
                _log(f"this run's checkpoints in {output_dir} are kept: continue it with --resume")
            raise
        earlier.discard()
        return result


def _train_in(config: RunConfig, output_dir: Path, resume: bool, earlier: EarlierRun) -> TrainResult:
    """`train` inside a checked, locked output_dir."""
    checkpoint = None
    if resume:
        found = checkpoints_newest_first(output_dir)  # which one is complete is decided once the Trainer exists
        if not found:
            raise UserInputError(f"--resume: no checkpoint-N folder in '{output_dir}' to resume from")
        checkpoint = str(found[0])
    task = config.model.task
    if config.lora.plan:
        read_plan(config.lora.plan)  # a bad plan fails before the data and the model are loaded
    run = prepare_run(config)
    model_path, tokenizer, datasets, label_names = run.model_path, run.tokenizer, run.datasets, run.label_names
    data_format, model = run.data_format, run.model
    args = build_training_arguments(config, output_dir, has_validation="validation" in datasets)
    collator = build_collator(tokenizer, task, packing=config.data.packing)
    model, allocation = attach_adapter(model, config, args, datasets["train"], collator, output_dir)
    shortcuts = find_shortcuts(model)
    trainable, total = model.get_nb_trainable_parameters()
    _log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    if shortcuts is not None:
        count = sum(1 for _ in shortcuts.named_connections())
        _log(f"shortcut connections: {count} ({sum(p.numel() for p in shortcuts.parameters()):,} parameters)")
    if allocation:
        active = allocation.strategy.totals()
        _log(
            f"{allocation.strategy.name}: total rank {active['total_rank']:,} before the first allocation "
            f"({active['active_parameters']:,} rank-component parameters; the rest is fixed capacity); "
            f"{RANK_HISTORY} records every change"
        )
    num_labels = len(label_names) if label_names else None
    stopper = StopOnSignal()
    trainer = RanktuneTrainer(
        model=model,
        args=args,
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("validation"),
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=trainer_classification_metrics(num_labels) if num_labels else None,
        callbacks=[stopper],
    )
    # First in line, so the values they add to a log event reach metrics.jsonl and the console.
    trainer.callback_handler.callbacks.insert(0, MetricsLogger(output_dir / METRICS_LOG, task == "causal_lm"))
    if allocation:
        trainer.callback_handler.callbacks.insert(0, allocation.callback)
    shortcut_checkpoints = ShortcutCheckpoints(shortcuts) if shortcuts is not None else None
    if shortcut_checkpoints:
        trainer.add_callback(shortcut_checkpoints)
    main_process = trainer.is_world_process_zero()

    test = datasets.get("test")
    eval_batch = args.per_device_eval_batch_size

    def test_metrics() -> dict[str, Any] | None:
        if test is None or not main_process:
            return None
        return evaluate(model, test, collator, task, num_labels, eval_batch)

    test_before = None if resume else test_metrics()
    if test_before:
        _log(f"test before training: {format_metrics(test_before)}")
    if checkpoint is not None:  # the newest whose files were all written (a kill can leave a newer one half-saved)
        chosen, skipped = select_resume_checkpoint(output_dir, trainer.checkpoint_files())
        _log(resume_message(chosen, skipped))
        checkpoint = str(chosen)
    if allocation and checkpoint:
        allocation.callback.resume_from = checkpoint
    if shortcut_checkpoints and checkpoint:
        shortcut_checkpoints.resume_from = checkpoint
    earlier.set_aside()
    if main_process:
        save_resolved_config(config, output_dir)
    try:
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        stopper.restore()
    if stopper.received is not None and trainer.state.global_step < trainer.state.max_steps:
        last = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        raise TrainingInterrupted(
            f"training stopped by signal {stopper.received}; checkpoint saved to {last}; "
            "continue with `ranktune train CONFIG --resume`"
        )  # a signal after the last step stops nothing: the adapter is written as usual
    metrics = {**train_output.metrics, **_final_validation(trainer, "validation" in datasets)}
    test_after = test_metrics()
    if test_after:
        _log(f"test after training:  {format_metrics(test_after)}")
    if not main_process:
        return TrainResult(output_dir, metrics)

    extra = {
        "task": task,
        "base_model_path": model_path,
        "label_names": label_names,
        "data_format": data_format,
        "allocation": config.allocation.method,
        "trainable_parameters": trainable,
        "metrics": metrics,
        "test_before": test_before,
        "test_after": test_after,
    }
    info: dict[str, Any] = {}

    def sidecars(staged: Path) -> dict[str, Any]:
        info.update(run_info(staged, config, extra))
        return {RUN_INFO: info}

    factors = allocation.strategy.folded_factors() if allocation else None
    write_adapter(model, tokenizer, output_dir, factors=factors, sidecars=sidecars, shortcuts=shortcuts)
    _log(f"adapter saved to {output_dir}")
    return TrainResult(output_dir, metrics, test_before, test_after, info)
