"""The console script's start-up: no library notice the user cannot act on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cli.helpers import run_cli

# Imports PEFT (which imports bitsandbytes) as every command that loads a model does, on a CPU whose AVX512-BF16
# check answers yes: bitsandbytes then tries the optional `kernels` package and logs a notice when it is missing.
IMPORT_ON_AVX512_BF16 = """
import importlib.abc, sys

class AnswerYes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes.backends.cpu.ops":
            import bitsandbytes.functional
            bitsandbytes.functional.has_avx512bf16 = lambda: True
        return None

sys.meta_path.insert(0, AnswerYes())
sys.modules["kernels"] = None  # as on a machine without it, whatever this one has
if sys.argv[1] == "quiet":
    from ranktune.cli.main import _quiet_libraries
    _quiet_libraries()
import peft
"""


def test_bitsandbytes_kernel_notice_is_silenced_at_its_source():
    pytest.importorskip("bitsandbytes")
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", IMPORT_ON_AVX512_BF16, mode], capture_output=True, text=True, timeout=300
        )
        for mode in ("debug", "quiet")
    }
    assert all(run.returncode == 0 for run in runs.values()), runs
    assert "Failed to load CPU gemm_4bit_forward" in runs["debug"].stderr  # the notice does appear without us
    assert runs["quiet"].stderr == ""


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "train", str(tmp_path / "absent.yaml"))
    assert result.returncode != 0 and "Traceback" in result.stderr
