"""EMMET's update: memorise every edit as an equality constraint, preserve C0's keys in least squares.

    Δ = R (K_Eᵀ C⁻¹ K_E + μI)⁻¹ K_Eᵀ C⁻¹,     C = λ C0 + εI

R (d_model, B), K_E (d_k, B). μ (``emmet_mu``) regularises the B×B system for batches (0.1 for B > 1); with
one request and μ = 0 it is ROME's rank-one update. Factors: A = R, B = C⁻¹ K_E (K_Eᵀ C⁻¹ K_E + μI)⁻¹.
"""

from __future__ import annotations

import torch


def emmet_update(
    residual: torch.Tensor, keys: torch.Tensor, cov: torch.Tensor, lam: float, ridge: float, mu: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A (d_model, B), B (d_k, B)), float64. residual: (d_model, B); keys: (d_k, B)."""
    k = keys.double()
    n = k.shape[1]
    c = lam * cov.double() + ridge * torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device)
    c_inv_k = torch.linalg.solve(c, k)  # (d_k, B)
    mu = mu if n > 1 else 0.0
    gram = k.T @ c_inv_k + mu * torch.eye(n, dtype=torch.float64, device=k.device)  # (B, B), symmetric
    return residual.double(), torch.linalg.solve(gram, c_inv_k.T).T
