"""A real 2-process DDP run on CPU (gloo): both processes take identical L1RA decisions and end identical."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("l1ra_worker.py")
REPO = Path(__file__).resolve().parents[2]


def run(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_processes_agree_and_match_one_process_with_the_same_global_batch(make_model_dir, tmp_path):
    model_dir = str(make_model_dir("llama"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581"]
    run([*torchrun, str(WORKER), model_dir, str(tmp_path / "ddp"), "2"])
    run([sys.executable, str(WORKER), model_dir, str(tmp_path / "single"), "4"])

    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"state-{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single" / "state-0.pt")
    moved = False
    for name, state in rank0.items():
        for key in ("mask", "gate", "A", "B"):
            assert torch.equal(state[key], rank1[name][key]), (name, key)  # bit-identical across processes
        assert torch.equal(state["mask"], single[name]["mask"]), name  # the same rank decisions as one process
        moved |= int(state["mask"].sum()) != 4
        for key in ("gate", "A", "B"):  # the same numbers up to the order of floating-point reductions
            torch.testing.assert_close(state[key], single[name][key], rtol=0, atol=1e-4)
    assert moved, "ranks should have moved in this run"
