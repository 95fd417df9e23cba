"""Capping ranks by truncated SVD, against an example whose singular values are set by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ranktune.serving.export import export_adapter
from ranktune.serving.truncate import cap_ranks
from tests.serving.helpers import heterogeneous_adapter, logits


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q  # (rows, cols), orthonormal columns


def test_capping_keeps_the_top_singular_directions_by_hand():
    """ΔW = U diag(3, 2, 1) Vᵀ, given as A = diag(σ) Vᵀ and B = U. Capped at 2: ΔW₂ = U₂ diag(3, 2) V₂ᵀ, error
    1 / √14 (√(1²) / √(9 + 4 + 1)). A second module of rank 2 (σ 4, 4) is kept as it is. Whole adapter:
    √1 / √(14 + 32) = 1 / √46."""
    u, v = orthonormal(5, 3, 0), orthonormal(7, 3, 1)  # out 5, in 7
    sigma = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    big = ((sigma[:, None] * v.T).float(), u.float())  # A (3, 7), B (5, 3)
    small_u, small_v = orthonormal(5, 2, 2), orthonormal(7, 2, 3)
    small = ((4 * small_v.T).float(), small_u.float())
    capped, truncation = cap_ranks({"big": big, "small": small}, 2)
    new_a, new_b = capped["big"]
    assert new_a.shape == (2, 7) and new_b.shape == (5, 2)
    expected = (u[:, :2] * sigma[:2]) @ v[:, :2].T
    torch.testing.assert_close((new_b @ new_a).double(), expected, rtol=0, atol=1e-6)
    assert truncation.errors == {"big": pytest.approx(1 / math.sqrt(14))}
    assert truncation.ranks_before == {"big": 3}
    assert truncation.total_error == pytest.approx(1 / math.sqrt(46))
    assert capped["small"][0] is small[0]  # below the cap: untouched


def test_capped_export_loads_in_peft_and_changes_only_the_capped_modules(tmp_path):
    model_dir, adapter = heterogeneous_adapter(tmp_path)
    result = export_adapter(adapter, tmp_path / "capped", "peft", max_rank=4)
    assert result.largest_rank == 4 and set(result.truncation.errors) == {"model.layers.0.mlp.down_proj"}
    assert 0 < result.truncation.errors["model.layers.0.mlp.down_proj"] < 1
    capped = logits(model_dir, tmp_path / "capped")
    full = logits(model_dir, adapter)
    assert 0 < (capped - full).abs().max() < (full - logits(model_dir, None)).abs().max()
    nothing = export_adapter(adapter, tmp_path / "same", "peft", max_rank=6)
    assert nothing.truncation.errors == {}
    torch.testing.assert_close(logits(model_dir, tmp_path / "same"), full, rtol=0, atol=1e-5)
