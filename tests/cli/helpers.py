"""Running the real console script in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


CONSOLE_SCRIPT = Path(sys.executable).parent / "ranktune"


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 600):
    """Runs the installed `ranktune` console script with ARGS and returns the CompletedProcess (text output)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """One `error:` line on stderr, the expected exit code, the fragments in the message, and no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


# A process that has paid the console script's imports once and forks a child per command: each command still runs
# in a process of its own, from `ranktune.cli.main.main`, with its own stdout and stderr, but in a second instead of
# the ten that importing torch, transformers and PEFT takes on a small machine.
_FORKING_SERVER = r"""
import json, os, sys
from ranktune.cli.main import _quiet_libraries, main
_quiet_libraries()  # as main() does before any heavy import
import datasets, peft, torch, transformers  # noqa: F401, E401
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    child = os.fork()
    if child == 0:
        os.chdir(request["cwd"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        try:
            code = main(request["argv"])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(child, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkingCli:
    """Runs `ranktune` commands in forked children of one process that imported the libraries once.

    What happens at import time (before `main` runs) is not seen per command; `tests/cli/test_main.py` checks that
    start-up separately, through the real console script.
    """

    def __init__(self, scratch: Path, timeout: float = 600) -> None:
        self.scratch = scratch
        self.timeout = timeout
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.server = subprocess.Popen(
            [sys.executable, "-c", _FORKING_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        if self._read_line() != "ready":
            raise RuntimeError("the forking CLI server did not start")

    def _read_line(self) -> str:
        ready, _, _ = select.select([self.server.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            raise TimeoutError(f"no answer from the forking CLI server in {self.timeout} s")
        return self.server.stdout.readline().strip()

    def run(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        stdout, stderr = self.scratch / "stdout.txt", self.scratch / "stderr.txt"
        request = {"argv": list(args), "cwd": str(cwd), "stdout": str(stdout), "stderr": str(stderr)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        code = json.loads(self._read_line())["code"]
        return subprocess.CompletedProcess(list(args), code, stdout.read_text(), stderr.read_text())

    def close(self) -> None:
        self.server.kill()
        self.server.wait()
