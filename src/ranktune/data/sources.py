"""Where examples come from: local json/jsonl/csv/parquet/txt files or hub datasets, and the train/validation/test
splits a run uses.

Every failure to read the user's data becomes a `UserInputError` naming the file (or the hub name), so the command
line reports it in one line instead of a datasets traceback. Positions in a file are lines and columns counted from 1,
as editors show them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetsError

from ranktune.config import DataConfig
from ranktune.errors import UserInputError, did_you_mean

# File extension -> the datasets builder that reads it (".txt": one row per line, in column "text").
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
EXTENSIONS = "/".join(suffix.lstrip(".") for suffix in BUILDERS)


def load_file(path: str, subset: str | None = None, split: str = "train") -> Dataset:
    """Loads one data source as a `Dataset`.

    `path` is a local file when it exists, carries a data file extension or is written as a path (absolute, `./`,
    `../`, `~`); the extension picks the reader. Anything else is a hub dataset name, loaded with
    `datasets.load_dataset(path, subset, split=split)`; `subset` and `split` only matter there.

    Raises:
        UserInputError: the file is missing, a directory, of an unsupported type, unreadable or empty; or the hub
            dataset cannot be loaded.
    """
    dataset = _load_local(Path(path).expanduser()) if _is_local(path) else _load_hub(path, subset, split)
    if len(dataset) == 0:
        raise UserInputError(f"data source '{path}' has no rows; expected at least one example")
    return dataset


def load_splits(config: DataConfig) -> DatasetDict:
    """Loads the splits of a run: "train", "validation" and, when `config.test` is set, "test".

    Without `config.validation`, a seeded `config.validation_split` fraction of train becomes the validation split.
    `max_train_samples` / `max_eval_samples` / `max_test_samples` then keep a seeded random subset of each split.

    Raises:
        UserInputError: a source cannot be loaded, or train is too small to split a validation set from.
    """
    train = load_file(config.train, config.subset, "train")
    if config.validation:
        validation = load_file(config.validation, config.subset, "validation")
    else:
        train, validation = _split_validation(train, config)
    splits = {
        "train": subsample(train, config.max_train_samples, config.seed),
        "validation": subsample(validation, config.max_eval_samples, config.seed),
    }
    if config.test:
        splits["test"] = subsample(load_file(config.test, config.subset, "test"), config.max_test_samples, config.seed)
    return DatasetDict(splits)


def require_columns(dataset: Dataset, split: str, columns: dict[str, str]) -> None:
    """Checks that a split has the columns the config names.

    Args:
        dataset: the split.
        split: its name, for the message.
        columns: config key (e.g. "data.text_column") -> the column name it sets.

    Raises:
        UserInputError: naming the first missing column, the key that asked for it, and the columns that exist.
    """
    existing = dataset.column_names
    for key, column in columns.items():
        if column not in existing:
            raise UserInputError(
                f"the {split} split has no column '{column}' (set by {key}); its columns are: "
                f"{', '.join(existing)}.{did_you_mean(column, existing)}"
            )


def _is_local(path: str) -> bool:
    local = Path(path).expanduser()
    return local.exists() or path.startswith(("/", "./", "../", "~")) or local.suffix.lower() in BUILDERS


def _load_local(path: Path) -> Dataset:
    if not path.exists():
        raise UserInputError(f"data file not found: {path}")
    if path.is_dir():
        raise UserInputError(f"{path} is a directory; expected a data file ({EXTENSIONS})")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        kind = path.suffix or "(no extension)"
        raise UserInputError(f"unsupported data file type '{kind}' for {path}; expected {EXTENSIONS}")
    if path.stat().st_size == 0:
        raise UserInputError(f"data file {path} is empty; expected at least one example")
    if builder != "parquet":
        _require_utf8(path)
    try:
        with _reader_log_silenced(builder):
            return load_dataset(builder, data_files=str(path), split="train")
    # The builders fail in many ways on bad files (StopIteration, ArrowInvalid, ValueError, DatasetGenerationError),
    # and the file exists and is readable by type, so any failure here is the content's fault.
    except Exception as error:
        problem = (_json_problem(path) if builder == "json" else None) or _root_cause(error)
        raise UserInputError(f"cannot read {path} as {builder.upper()}: {problem}") from None


@contextmanager
def _reader_log_silenced(builder: str) -> Iterator[None]:
    """Mutes the datasets reader's own log: it logs the error it raises, which our message then replaces."""
    reader_log = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")
    level = reader_log.level
    reader_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        reader_log.setLevel(level)


def _require_utf8(path: Path) -> None:
    """Refuses a text file that is not UTF-8, naming the first bad line and column.

    The readers would otherwise fail without a position (CSV, text, JSON) or, for JSON lines, not at all: the bad
    bytes would reach the tokenizer.

    Raises:
        UserInputError: naming the file, the line and column, and the byte.
    """
    line = 1
    with path.open("rb") as file:
        while lines := file.readlines(1 << 20):  # whole lines, about 1 MiB at a time
            block = b"".join(lines)
            try:
                block.decode("utf-8")
            except UnicodeDecodeError as error:
                line += block.count(b"\n", 0, error.start)
                line_start = block.rfind(b"\n", 0, error.start) + 1
                column = len(block[line_start : error.start].decode("utf-8")) + 1
                raise UserInputError(
                    f"data file {path} is not UTF-8 text: line {line}, column {column} holds the byte "
                    f"0x{block[error.start]:02x} ({error.reason}); save the file as UTF-8"
                ) from None
            line += len(lines)


def _json_problem(path: Path) -> str | None:
    """Where a JSON or JSON lines file breaks, as "line L, column C: problem"; None when Python's parser finds nothing.

    pyarrow's own message counts rows from 0 within each block it reads, which matches no line of the file.
    """
    text = path.read_text(encoding="utf-8-sig")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":  # one document, broken at this position
            return f"line {error.lineno}, column {error.colno}: {error.msg}"
    for number, line in enumerate(text.split("\n"), start=1):  # JSON lines: one object per line
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            return f"line {number}, column {error.colno}: {error.msg}"
        if not isinstance(value, dict):
            return f"line {number}: expected one JSON object per line, got {type(value).__name__} {line.strip()[:40]}"
    return None


def _load_hub(name: str, subset: str | None, split: str) -> Dataset:
    try:
        return load_dataset(name, subset, split=split)
    except (OSError, ValueError, DatasetsError) as error:
        raise UserInputError(
            f"cannot load data '{name}': it is no local file ({EXTENSIONS}), and loading it as a hub dataset "
            f"(subset {subset!r}, split '{split}') failed: {_root_cause(error)}"
        ) from None


def _split_validation(train: Dataset, config: DataConfig) -> tuple[Dataset, Dataset]:
    try:
        parts = train.train_test_split(test_size=config.validation_split, seed=config.seed)
    except ValueError:
        raise UserInputError(
            f"{config.train} has {len(train)} row(s): too few to split off a validation set "
            f"(data.validation_split={config.validation_split}); give data.validation or more examples"
        ) from None
    return parts["train"], parts["test"]


def subsample(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of at most `limit` rows (shuffle, then the first `limit`); all rows when no limit."""
    if limit is None:
        return dataset
    return dataset.shuffle(seed=seed).select(range(min(limit, len(dataset))))


def _root_cause(error: BaseException) -> str:
    """The innermost cause's message: datasets wraps the informative parser error in a generic one."""
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error) or type(error).__name__


def require_texts(values: list[Any], split: str, column: str, rows: list[int]) -> list[str]:
    """Returns the column's values, refusing a non-text one with the split, example number and column named.

    Raises:
        UserInputError: a value that is not a string.
    """
    for value, row in zip(values, rows, strict=True):
        if not isinstance(value, str):
            raise UserInputError(f"the {split} split, example {row}: column '{column}' must hold text, got {value!r}")
    return values
