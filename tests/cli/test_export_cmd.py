"""`ranktune export` through the real command line: the output tree, the report, and what inspect says of it."""

from __future__ import annotations

import json

import gguf
import pytest

from tests.cli.helpers import ForkingCli
from tests.serving.helpers import heterogeneous_adapter


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    runner = ForkingCli(tmp_path_factory.mktemp("export-cli"))
    yield runner
    runner.close()


def test_uniform_export_with_a_rank_cap_writes_the_adapter_tree(tmp_path, cli):
    _, adapter = heterogeneous_adapter(tmp_path)
    out = tmp_path / "served"
    result = cli.run("export", str(adapter), "--out", str(out), "--format", "uniform", "--max-rank", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", "export.json"]
        + [p.name for p in adapter.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab"))]
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "reduced 1 modules to rank 4 (relative error of ΔW):"
    assert lines[1].startswith("  model.layers.0.mlp.down_proj: rank 6 -> 4, error 0.")
    assert lines[-2] == "uniform form: 8 modules, largest rank 4 (vLLM: --max-lora-rank 8)"
    assert lines[-1] == f"written: {out}"
    info = json.loads((out / "export.json").read_text())
    reduced = info["truncation"]["modules"]
    assert info["largest_rank"] == 4 and reduced["model.layers.0.mlp.down_proj"]["rank_before"] == 6
    shown = cli.run("inspect", str(out), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "largest rank 4: engines pad every module to it (vLLM serves it with --max-lora-rank 8;" in shown.stdout


def test_gguf_export_writes_one_file(tmp_path, cli):
    _, adapter = heterogeneous_adapter(tmp_path)
    result = cli.run("export", str(adapter), "--out", str(tmp_path / "a.gguf"), "--format", "gguf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"written: {tmp_path / 'a.gguf'}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "adapter", "base"]
    assert len(gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors) == 16  # 8 modules, A and B
