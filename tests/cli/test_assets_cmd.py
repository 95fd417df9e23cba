"""`ranktune assets`, run as the real console script against a private, offline cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ASSET_NAMES = ("minilm-l6", "smollm2-135m", "rotten-tomatoes", "shakespeare", "chatterbot-qa", "snli", "trec")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A cache where `shakespeare` looks fetched (its folder exists) and nothing else does."""
    (tmp_path / "shakespeare").mkdir()
    return tmp_path


def ranktune(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RANKTUNE_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "ranktune", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_list_shows_every_asset_and_whether_it_is_fetched(cache):
    result = ranktune(cache, "assets", "list")

    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    assert rows == {name: "yes" if name == "shakespeare" else "no" for name in ASSET_NAMES}


def test_path_prints_the_cached_folder_without_fetching(cache):
    result = ranktune(cache, "assets", "path", "shakespeare")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{cache.resolve() / 'shakespeare'}\n"
    assert sorted(path.name for path in cache.iterdir()) == ["shakespeare"]


def test_path_of_an_unknown_asset_exits_2_with_one_line(cache):
    result = ranktune(cache, "assets", "path", "nope")

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "'nope'" in lines[0] and all(name in lines[0] for name in ASSET_NAMES)
