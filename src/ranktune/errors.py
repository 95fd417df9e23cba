"""Errors that the command line turns into one clear message and an exit code.

Bad input (a config, a data file, an asset, a path the user gave) is a `UserInputError` and exits with 2; a failure
while doing valid work is a `RuntimeFailure` and exits with 1. Everything else is a bug and shows a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RanktuneError(Exception):
    """Base of the errors ranktune reports without a traceback."""

    exit_code = 1


class UserInputError(RanktuneError):
    """The user's input is wrong: what is wrong, where, and what is expected."""

    exit_code = 2


class RuntimeFailure(RanktuneError):
    """Valid input, but the work failed (out of memory, a crashed download, ...)."""

    exit_code = 1


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """Returns the candidate most similar to `name`, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Formats a ' Did you mean 'x'?' suffix, empty when nothing is close."""
    match = closest(name, candidates)
    return f" Did you mean '{match}'?" if match else ""
