"""MEMIT's batched least-squares update at one layer of the spread (W is (d_model, d_k), keys are columns).

    Δ_i = R_i K_iᵀ (λ C0 + K_i K_iᵀ)⁻¹,     R_i = (Z − H_L) / (L − i)

R_i (d_model, B) is this layer's share of the residual still missing at the last edited layer, K_i (d_k, B)
the keys. Solved in float64, never inverted: X = (λC0 + εI + K Kᵀ)⁻¹ K, so ΔW = R Xᵀ (rank ≤ B).
"""

from __future__ import annotations

import torch


def memit_update(
    residual: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, lam: float, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A = R (d_model, B), B = X (d_k, B)), float64. residual: (d_model, B); keys: (d_k, B)."""
    k = keys.double()
    c = lam * cov.double() + ridge * torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device) + k @ k.T
    return residual.double(), torch.linalg.solve(c, k)
