"""One run at a time in an output_dir: an exclusive lock held for the whole of `ranktune train`.

Two runs writing into one folder would replace each other's adapter and interleave their metrics.jsonl; the second
one gets a clear error naming the first instead. The lock is an advisory `flock` on a hidden file, so it is released
by the operating system when the process ends, however it ends (a killed run never leaves a folder locked). The
file stays behind and says which process held it last.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ranktune.errors import UserInputError

LOCK_FILE = ".ranktune.lock"


def _holder(lock_path: Path) -> str:
    """'pid N, started T' from the lock file, or '' when it cannot be read."""
    try:
        holder = json.loads(lock_path.read_text(encoding="utf-8"))
        return f" (pid {holder['pid']}, started {holder['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


@contextmanager
def output_dir_lock(output_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Holds the run lock of `output_dir` for the duration of the block.

    Args:
        output_dir: an existing, writable folder.
        enabled: False for the non-main processes of a distributed launch (process 0 holds it for all of them).

    Raises:
        UserInputError: another ranktune run holds the lock.
    """
    if not enabled:
        yield
        return
    lock_path = output_dir / LOCK_FILE
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(
                f"output_dir '{output_dir}' is in use by another ranktune run{_holder(lock_path)}; wait for it to "
                "finish or choose another output_dir"
            ) from None
        holder = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # closing the descriptor releases the lock
