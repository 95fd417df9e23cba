"""Capping ranks: a module above the cap is replaced by the best approximation of its update at the cap's rank.

By the Eckart-Young theorem the truncated SVD of ΔW = B · A is the closest rank-N matrix in Frobenius norm, so the
relative error √(Σ_{i>N} σ_i²) / √(Σ σ_i²) is the least any rank-N adapter can have for that module. The SVD is
taken through QR factors of B and Aᵀ, so only a k × k matrix is decomposed, never the out × in product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Truncation:
    """What capping did: each reduced module's relative Frobenius error and its rank before, and the error of the
    whole adapter (all modules' discarded energy over all modules' energy)."""

    errors: dict[str, float]
    ranks_before: dict[str, int]
    total_error: float


def singular_factors(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, k), σ (k,), V (in, k) with B · A = U diag(σ) Vᵀ, σ descending. A: (k, in); B: (out, k)."""
    q_b, r_b = torch.linalg.qr(lora_b.double())  # (out, k), (k, k)
    q_a, r_a = torch.linalg.qr(lora_a.double().T)  # (in, k), (k, k)
    u_core, sigma, vt_core = torch.linalg.svd(r_b @ r_a.T)  # the k × k core of B · A = Q_b (R_b R_aᵀ) Q_aᵀ
    return q_b @ u_core, sigma, q_a @ vt_core.T


def cap_ranks(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]], max_rank: int
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], Truncation]:
    """Every module of rank above `max_rank` replaced by its best rank-`max_rank` approximation, split evenly
    (√σ on each side); the others are kept as they are. A: (k, in); B: (out, k), scale folded in."""
    capped: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, float] = {}
    before: dict[str, int] = {}
    kept_energy = dropped_energy = 0.0
    for name, (lora_a, lora_b) in modules.items():
        u, sigma, v = singular_factors(lora_a, lora_b)
        energy = float(sigma.pow(2).sum())
        if lora_a.shape[0] <= max_rank:
            capped[name] = (lora_a, lora_b)
            kept_energy += energy
            continue
        root = sigma[:max_rank].sqrt()
        new_a = (root[:, None] * v[:, :max_rank].T).to(lora_a.dtype)  # (N, in)
        new_b = (u[:, :max_rank] * root).to(lora_b.dtype)  # (out, N)
        dropped = float(sigma[max_rank:].pow(2).sum())
        capped[name] = (new_a.contiguous(), new_b.contiguous())
        errors[name] = math.sqrt(dropped / energy) if energy > 0 else 0.0
        before[name] = int(lora_a.shape[0])
        kept_energy += energy - dropped
        dropped_energy += dropped
    whole = kept_energy + dropped_energy
    return capped, Truncation(errors, before, math.sqrt(dropped_energy / whole) if whole > 0 else 0.0)
