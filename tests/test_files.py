"""staged_folder: the target appears complete, with ordinary permissions, or not at all."""

from __future__ import annotations

import pytest

from ranktune.files import staged_folder


def test_target_appears_with_its_files_and_readable_permissions(tmp_path):
    target = tmp_path / "nested" / "model"
    with staged_folder(target, ".model-") as staging:
        (staging / "weights.bin").write_text("w")
        assert not target.exists()
    assert (target / "weights.bin").read_text() == "w"
    assert target.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_an_empty_target_is_replaced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with staged_folder(target, ".out-") as staging:
        (staging / "f").write_text("x")
    assert (target / "f").read_text() == "x"


def test_a_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "out", ".out-") as staging:
        (staging / "half").write_text("x")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
