"""Writing a folder or a file so that it appears complete or not at all, and never onto a command's own input;
reading a file a config names once."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ranktune.errors import UserInputError

T = TypeVar("T")
_READ: dict[tuple[Any, ...], Any] = {}

STAGING_PREFIX = ".ranktune-staging-"
"""Names of the hidden files and folders a write is staged in; a run removes the ones a kill left in its output_dir."""


@contextmanager
def staged_folder(target: Path, prefix: str) -> Iterator[Path]:
    """Yields an empty hidden folder beside `target`; when the block succeeds, renames it to `target` in one step.

    A missing or empty `target` is replaced; a failure leaves no trace. The folder gets ordinary permissions
    (mkdtemp makes it private), so the result reads like any other folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    staging.chmod(0o755)
    try:
        yield staging
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def drop_records_after(path: Path, step: int) -> None:
    """Keeps the JSON lines of `path` whose "step" is at most `step`: what a resumed run had written before its
    checkpoint, without the rows a run that died after the checkpoint left behind."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Writes `text` to a hidden file beside `path`, then renames it into place: the file is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)  # also hard links and different spellings of one path
    return a.resolve() == b.resolve()


def folder_inputs(folder: Path, description: str) -> dict[Path, str]:
    """Every file below `folder`, each described as `description` (for `check_output_file`)."""
    return {path: description for path in folder.rglob("*") if path.is_file()}


def check_output_file(path: str, option: str, inputs: dict[Path, str] | None = None) -> Path:
    """The path a command may write, checked before any work is done.

    Args:
        path: the file name the user gave.
        option: the option that named it, for messages (`--predictions`).
        inputs: {file the command reads: what it is}; the output must be none of them.

    Raises:
        UserInputError: the path is a folder or one of the inputs, or its folder cannot be created or written.
    """
    target = Path(path)
    if target.is_dir():
        raise UserInputError(f"{option} '{path}' is a folder; give a file name")
    for source, description in (inputs or {}).items():
        if _same_file(target, source):
            raise UserInputError(f"{option} '{path}' is {description}, which this command reads; choose another file")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserInputError(f"{option} '{path}': '{folder}' is a file, so no folder can be made there")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(f"{option} '{path}': the folder '{folder}' is not writable")
    return target


def read_once(path: str | Path, parse: Callable[..., T], *args: Any) -> T:
    """`parse(path, *args)`, computed once per version of the file: a config's plan or reference TOML is checked when
    the config is validated and used again when the model is built, without a second read.

    A version is the file's resolved path, size and modification time, so a file rewritten between two runs of one
    process is read again. Failures are not kept: the next call reports them again.
    """
    try:
        stat = Path(path).stat()
    except OSError:
        return parse(path, *args)  # the parser says what is wrong
    key = (parse, args, str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _READ:
        _READ[key] = parse(path, *args)
    return _READ[key]
