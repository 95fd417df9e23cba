"""Writing a folder or a file so that it appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return path
