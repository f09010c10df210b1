"""ROME's rank-one update (one layer, one request; W is (d_model, d_k), keys are columns).

    ΔW = (v* − W k) (C⁻¹ k*)ᵀ / (kᵀ C⁻¹ k*),     C = λ·C0 + εI

k* is the context-averaged key, k the key at the bare prompt, so ΔW k = v* − W k exactly. λ cancels in the
ratio (it only matters against ε).
"""

from __future__ import annotations

import torch


def rome_update(
    residual: torch.Tensor, key_star: torch.Tensor, key_bare: torch.Tensor, cov: torch.Tensor, lam: float, ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A (d_model, 1), B (d_k, 1)) with ΔW = A Bᵀ, float64.

    residual: v* − W k (d_model,); key_star, key_bare: (d_k,); cov: C0 (d_k, d_k).
    """
    c = lam * cov.double() + ridge * torch.eye(cov.shape[0], dtype=torch.float64, device=cov.device)
    u = torch.linalg.solve(c, key_star.double()[:, None])  # C⁻¹ k*, (d_k, 1)
    denom = key_bare.double() @ u[:, 0]
    return residual.double()[:, None], u / denom
