"""What the benchmark scripts share: the machine line, a step timer, and docs/benchmarks.md's sections.

docs/benchmarks.md gathers the results of several scripts. Each script rewrites only its own section (between
`<!-- begin NAME -->` and `<!-- end NAME -->`), so running one script leaves the others' measurements in place and
running all of them regenerates the whole document.
"""

from __future__ import annotations

import json
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

BENCHMARKS_DOC = Path("docs/benchmarks.md")
SECTIONS = ("overhead", "fsdp", "throughput")  # their order in the document
_HEADER = """# Benchmarks

Speed and memory of ranktune, each section written by the script it names; every comparison ran side by side in one
run of its script. The quality study (what each method buys in accuracy or loss) is in [results.md](results.md).
"""


def bf16_available() -> bool:
    """Whether training runs in bf16 here: on GPUs that support it, as ranktune's own default does."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def machine() -> str:
    """OS, CPU, accelerator and torch version, for the record (a GPU's name means bf16: see `bf16_available`)."""
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.platform()}; {platform.processor() or platform.machine()}; {device}; torch {torch.__version__}"


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step of a Trainer run."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def peak_memory_mib() -> float:
    """This process's peak memory: CUDA's max allocated on a GPU, else the peak resident set (model included)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux


def run_worker(module: str, *args: str) -> dict[str, Any]:
    """Runs `python -m MODULE --worker ARGS` in a fresh process (its own peak memory) and returns the JSON object
    it prints last; exits with the worker's error output if it fails."""
    done = subprocess.run([sys.executable, "-m", module, "--worker", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the worker `{module} --worker {' '.join(args)}` failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _marker(name: str, edge: str) -> str:
    return f"<!-- {edge} {name} -->"


def update_section(name: str, markdown: str, path: Path = BENCHMARKS_DOC) -> Path:
    """Replaces section `name` of the benchmarks document with `markdown`, keeping the other sections as they are.

    Raises:
        ValueError: an unknown section name.
    """
    if name not in SECTIONS:
        raise ValueError(f"unknown section {name!r}; expected one of {SECTIONS}")
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    kept = {}
    for other in SECTIONS:
        pattern = re.escape(_marker(other, "begin")) + r"\n(.*?)\n" + re.escape(_marker(other, "end"))
        found = re.search(pattern, text, flags=re.S)
        if found:
            kept[other] = found.group(1)
    kept[name] = markdown.strip("\n")
    parts = [_HEADER]
    for section in SECTIONS:
        if section in kept:
            parts.append(f"{_marker(section, 'begin')}\n{kept[section]}\n{_marker(section, 'end')}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
