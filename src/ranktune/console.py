"""Progress lines on stderr, written by the main process only (under torchrun every process would repeat them)."""

from __future__ import annotations

import os
import sys


def launched_as_main() -> bool:
    """Whether this is the main process of a torchrun / accelerate launch (or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def progress(message: str) -> None:
    """One `[ranktune] message` line on stderr, from the main process."""
    if launched_as_main():
        print(f"[ranktune] {message}", file=sys.stderr, flush=True)
