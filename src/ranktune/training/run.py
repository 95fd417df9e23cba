"""`ranktune train`: config → data → model + LoRA → Trainer → adapter, metrics and reports in output_dir."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ranktune.adapters.layout import RANK_HISTORY, RUN_INFO
from ranktune.adapters.shortcuts import ShortcutSet, find_shortcuts
from ranktune.allocation.callback import AllocationCallback
from ranktune.allocation.registry import AdaptedModel, BuildContext, build_adapter, method_of
from ranktune.config import DataConfig, RunConfig
from ranktune.console import launched_as_main, progress
from ranktune.data import build_collator, detect_format, load_splits, prepare_causal_lm, prepare_classification
from ranktune.errors import RanktuneError, UserInputError
from ranktune.evaluation import evaluate, format_metrics, trainer_classification_metrics
from ranktune.export import write_adapter
from ranktune.models import load_base_model, load_tokenizer, resolve_model_path
from ranktune.models.loading import load_model_config
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
from ranktune.training.zero import gathered_adapter, partitioned


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
    set_seed(config.seed)  # the new head and LoRA's A are drawn before the Trainer seeds
    model_path = resolve_model_path(config.model.name_or_path)
    data = _resolve_data_paths(config.data)
    pretrained_config = load_model_config(model_path, config.model)  # read once: the tokenizer's EOS, the model type
    tokenizer = load_tokenizer(model_path, config.model, pretrained_config)
    progress(f"preparing data from {data.train}")
    datasets, label_names, data_format = _prepare_datasets(config, data, tokenizer, pretrained_config.model_type)
    progress(f"loading {config.model.name_or_path} ({config.model.task})")
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
    main_process = launched_as_main()
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
                progress(f"this run's checkpoints in {output_dir} are kept: continue it with --resume")
            raise
        earlier.discard()
        return result


def _train_in(config: RunConfig, output_dir: Path, resume: bool, earlier: EarlierRun) -> TrainResult:
    """`train` inside a checked, locked output_dir, step by step."""
    if resume:
        require_checkpoint(output_dir)  # which one is complete is decided once the Trainer knows its files
    run = prepare_run(config)
    if "gguf" in config.export.formats:
        from ranktune.serving.export import check_gguf_base

        check_gguf_base(run.model.config.architectures)  # before training, not after it
    args = build_training_arguments(config, output_dir, has_validation="validation" in run.datasets)
    collator = build_collator(run.tokenizer, config.model.task, packing=config.data.packing)
    adapted = build_model_and_adapter(config, run, args, collator, output_dir)
    session = build_trainer(config, run, adapted, args, collator, output_dir)
    sharded = session.trainer.is_fsdp_enabled  # the model is sharded only when training starts
    test_before = None if resume or sharded else session.test_metrics()
    if sharded and not resume and "test" in run.datasets:
        progress("test before training: not scored under FSDP (before training starts the model is not sharded yet)")
    if test_before:
        progress(f"test before training: {format_metrics(test_before)}")
    checkpoint = choose_resume_checkpoint(session.trainer, output_dir) if resume else None
    earlier.set_aside()
    if session.main_process:
        save_resolved_config(config, output_dir)
    metrics = run_training(session, checkpoint, output_dir)
    test_after = session.test_metrics()
    if test_after:
        progress(f"test after training:  {format_metrics(test_after)}")
    with gathered_adapter(session.adapted.model):  # ZeRO-3: every process takes part in gathering the adapter
        if not session.main_process:
            return TrainResult(output_dir, metrics)
        report = {"metrics": metrics, "test_before": test_before, "test_after": test_after}
        info = export_adapter(config, run, session, output_dir, report)
    return TrainResult(output_dir, metrics, test_before, test_after, info)


def require_checkpoint(output_dir: Path) -> None:
    """--resume needs at least one checkpoint-N folder; checked before anything is loaded.

    Raises:
        UserInputError: output_dir holds none.
    """
    if not checkpoints_newest_first(output_dir):
        raise UserInputError(f"--resume: no checkpoint-N folder in '{output_dir}' to resume from")


def build_model_and_adapter(
    config: RunConfig, run: PreparedRun, args: TrainingArguments, collator: Callable, output_dir: Path
) -> AdaptedModel:
    """The base model wrapped by the config's allocation method (LoRA, shortcut connections, the strategy)."""
    context = BuildContext(args, run.datasets["train"], collator, output_dir, seed=config.seed)
    adapted = build_adapter(run.model, config, context)
    trainable, total = adapted.model.get_nb_trainable_parameters()
    progress(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    shortcuts = find_shortcuts(adapted.model)
    if shortcuts is not None:
        count = sum(1 for _ in shortcuts.named_connections())
        progress(f"shortcut connections: {count} ({sum(p.numel() for p in shortcuts.parameters()):,} parameters)")
    if adapted.strategy is not None:
        totals = adapted.strategy.totals()
        if method_of(config.allocation).capabilities.moves_ranks == "before_training":
            progress(
                f"{adapted.strategy.name}: total rank {totals.total_rank:,} chosen before step 0 "
                f"({totals.active_parameters:,} rank-component parameters); {RANK_HISTORY} records each module's rank"
            )
        else:
            progress(
                f"{adapted.strategy.name}: total rank {totals.total_rank:,} before the first allocation "
                f"({totals.active_parameters:,} rank-component parameters; the rest is fixed capacity); "
                f"{RANK_HISTORY} records every change"
            )
    return adapted


@dataclass
class TrainingSession:
    """A Trainer ready to run, with what the steps after training need from its construction."""

    trainer: RanktuneTrainer
    adapted: AdaptedModel
    stopper: StopOnSignal
    test_metrics: Callable[[], dict[str, Any] | None]
    trainable_parameters: int
    """Counted before training (L1RA's gates become trainable when it starts)."""
    shortcuts: ShortcutSet | None
    """The shortcut connections the Trainer checkpoints and the export writes beside the adapter."""

    @property
    def main_process(self) -> bool:
        """Whether this process writes output_dir (the only one under DDP that does)."""
        return self.trainer.is_world_process_zero()


def build_trainer(
    config: RunConfig,
    run: PreparedRun,
    adapted: AdaptedModel,
    args: TrainingArguments,
    collator: Callable,
    output_dir: Path,
) -> TrainingSession:
    """The Trainer and its callbacks, in the order they run.

    The allocation callback and the metrics logger run before the Trainer's own callbacks, so the values they add to
    a log event reach metrics.jsonl and the console; the signal handler and the shortcut checkpoints run after.
    """
    task = config.model.task
    num_labels = len(run.label_names) if run.label_names else None
    shortcuts = find_shortcuts(adapted.model)
    stopper = StopOnSignal()
    first: list[TrainerCallback] = []
    if adapted.strategy is not None:
        first.append(AllocationCallback(adapted.strategy, output_dir / RANK_HISTORY))
    first.append(MetricsLogger(output_dir / METRICS_LOG, task == "causal_lm"))
    last: list[TrainerCallback] = [stopper]
    if shortcuts is not None:
        last.append(ShortcutCheckpoints(shortcuts))
    trainer = RanktuneTrainer(
        model=adapted.model,
        args=args,
        train_dataset=run.datasets["train"],
        eval_dataset=run.datasets.get("validation"),
        data_collator=collator,
        processing_class=run.tokenizer,
        compute_metrics=trainer_classification_metrics(num_labels) if num_labels else None,
        callbacks=last,
    )
    trainer.callback_handler.callbacks[:0] = first
    test = run.datasets.get("test")

    def test_metrics() -> dict[str, Any] | None:
        # A model sharded by FSDP or partitioned by ZeRO-3 runs a forward pass only with every process taking part:
        # each scores the test set (the same batches everywhere, so the collectives pair up).
        together = trainer.is_fsdp_enabled or partitioned(adapted.model)
        if test is None or not (trainer.is_world_process_zero() or together):
            return None
        metrics = evaluate(adapted.model, test, collator, task, num_labels, args.per_device_eval_batch_size)
        return metrics if trainer.is_world_process_zero() else None

    trainable = adapted.model.get_nb_trainable_parameters()[0]
    return TrainingSession(trainer, adapted, stopper, test_metrics, trainable, shortcuts)


def choose_resume_checkpoint(trainer: RanktuneTrainer, output_dir: Path) -> str:
    """The newest checkpoint whose files were all written (a kill can leave a newer one half-saved)."""
    chosen, skipped = select_resume_checkpoint(output_dir, trainer.checkpoint_files())
    progress(resume_message(chosen, skipped))
    return str(chosen)


def run_training(session: TrainingSession, checkpoint: str | None, output_dir: Path) -> dict[str, Any]:
    """Trains (from `checkpoint` if given); returns the training metrics and the final validation metrics.

    Raises:
        TrainingInterrupted: a signal stopped training before the last step; a checkpoint was saved.
    """
    trainer, stopper = session.trainer, session.stopper
    try:
        train_output = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        stopper.restore()
    if stopper.stopped and trainer.state.global_step < trainer.state.max_steps:
        last = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        cause = f"signal {stopper.received}" if stopper.received is not None else "a signal to another process"
        raise TrainingInterrupted(
            f"training stopped by {cause}; checkpoint saved to {last}; continue with `ranktune train CONFIG --resume`"
        )  # a signal after the last step stops nothing: the adapter is written as usual
    return {**train_output.metrics, **_final_validation(trainer, trainer.eval_dataset is not None)}


def export_adapter(
    config: RunConfig, run: PreparedRun, session: TrainingSession, output_dir: Path, report: dict[str, Any]
) -> dict[str, Any]:
    """Writes the adapter, its shortcut connections and ranktune.json into output_dir; returns ranktune.json's
    content. `report`: the metrics and test results to record."""
    model, strategy = session.adapted.model, session.adapted.strategy
    extra = {
        "task": config.model.task,
        "base_model_path": run.model_path,
        "label_names": run.label_names,
        "data_format": run.data_format,
        "allocation": config.allocation.method,
        "trainable_parameters": session.trainable_parameters,
        **report,
    }
    info: dict[str, Any] = {}

    def sidecars(staged: Path) -> dict[str, Any]:
        info.update(run_info(staged, config, extra))
        return {RUN_INFO: info}

    factors = strategy.folded_factors() if strategy is not None else None
    write_adapter(
        model,
        run.tokenizer,
        output_dir,
        factors=factors,
        sidecars=sidecars,
        shortcuts=session.shortcuts,
        initial_adapter=session.adapted.initial_adapter,
    )
    progress(f"adapter saved to {output_dir}")
    from ranktune.serving.export import write_serving_forms

    try:  # the run is finished and its adapter written: a serving form that cannot be made must not undo that
        results = write_serving_forms(output_dir, config.export.formats, config.export.max_rank)
    except RanktuneError as error:
        progress(f"serving forms not written ({error}); make them with `ranktune export {output_dir} ...`")
        results = []
    for result in results:
        serving = result.vllm_max_lora_rank
        progress(
            f"{result.form} form: {result.path} (largest rank {result.largest_rank}; vLLM --max-lora-rank {serving})"
        )
        for warning in result.warnings:
            progress(f"{result.form} form: {warning}")
    return info
