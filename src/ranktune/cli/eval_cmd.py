"""`ranktune eval ADAPTER_DIR --data FILE [--json]`: accuracy + macro-F1, or loss + perplexity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ranktune.adapters.layout import read_adapter_config
from ranktune.config import DataConfig
from ranktune.errors import UserInputError
from ranktune.files import check_output_file, folder_inputs, write_text_atomically


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate an adapter on a data file")
    parser.add_argument("adapter_dir")
    parser.add_argument("--data", required=True, help="a local json/jsonl/csv/parquet/txt file, or asset:NAME/FILE")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--max-samples", type=int, metavar="N", help="score a seeded random N rows of the file (the run's data seed)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--predictions", metavar="FILE.jsonl", help="classification: write each example's prediction")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code that the adapter's tokenizer or base model ships (only for folders you trust)",
    )
    parser.set_defaults(func=run)


def data_config_of(info: dict, data_path: str) -> DataConfig:
    """The training run's data settings (columns, max_length, format) applied to another file."""
    section = dict(info.get("config", {}).get("data", {}))
    section.update(train=data_path, validation=None, test=None, max_train_samples=None, packing=False)
    if info.get("data_format"):
        section["format"] = info["data_format"]
    return DataConfig.model_validate(section)


def write_predictions(path: Path, predictions, labels, label_names: list[str]) -> None:
    """One JSON object per example, in file order: the true and the predicted label; the file is whole or absent."""
    rows = [
        json.dumps({"index": i, "label": label_names[int(y)], "prediction": label_names[int(p)]})
        for i, (p, y) in enumerate(zip(predictions, labels, strict=True))
    ]
    write_text_atomically(path, "\n".join(rows) + "\n")


def run(args: argparse.Namespace) -> int:
    adapter_dir = Path(args.adapter_dir)
    adapter_config = read_adapter_config(adapter_dir)  # refuse a wrong folder before importing torch
    if args.batch_size <= 0:
        raise UserInputError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.max_samples is not None and args.max_samples <= 0:
        raise UserInputError(f"--max-samples must be > 0, got {args.max_samples}")
    if args.max_samples is not None and args.predictions:
        raise UserInputError("--predictions lists every row of the file in order: leave out --max-samples with it")
    if args.predictions and adapter_config.get("task_type") == "CAUSAL_LM":
        raise UserInputError("--predictions is for classification adapters")
    from datasets import DatasetDict

    from ranktune import assets

    data_path = assets.resolve(args.data)
    predictions_path = None
    if args.predictions:
        inputs = {
            **folder_inputs(adapter_dir, f"a file of the adapter folder '{adapter_dir}'"),
            Path(data_path): "the --data file",
        }
        predictions_path = check_output_file(args.predictions, "--predictions", inputs)

    from ranktune.adapters.loading import load_adapter
    from ranktune.data import build_collator, load_file, prepare_causal_lm, prepare_classification, subsample
    from ranktune.evaluation import classification_metrics, evaluate, predict_classes

    loaded = load_adapter(adapter_dir, trust_remote_code=args.trust_remote_code)
    config = data_config_of(loaded.info, data_path)
    rows = subsample(load_file(data_path, config.subset), args.max_samples, config.seed)
    splits = DatasetDict({"train": rows})
    if loaded.task == "classification":
        prepared, _ = prepare_classification(splits, loaded.tokenizer, config, label_names=loaded.label_names)
    else:
        prepared = prepare_causal_lm(splits, loaded.tokenizer, config, model_type=loaded.model.config.model_type)
    collator = build_collator(loaded.tokenizer, loaded.task)
    num_labels = len(loaded.label_names) if loaded.label_names else None
    if predictions_path:  # a classification adapter: causal-LM ones were refused above
        predictions, labels = predict_classes(loaded.model, prepared["train"], collator, args.batch_size)
        write_predictions(predictions_path, predictions, labels, loaded.label_names)
        metrics = {**classification_metrics(predictions, labels, num_labels), "examples": len(labels)}
    else:
        metrics = evaluate(loaded.model, prepared["train"], collator, loaded.task, num_labels, args.batch_size)
    if args.json:
        print(json.dumps({"adapter": str(loaded.adapter_dir), "data": args.data, "task": loaded.task, **metrics}))
    else:
        for key, value in metrics.items():
            print(f"{key:<12} {value:.4f}" if isinstance(value, float) else f"{key:<12} {value}")
    return 0
