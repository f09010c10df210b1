"""AlphaEdit's null-space-projected update (for sequential batches).

    P = U₀ U₀ᵀ, U₀ = eigenvectors of C0 with eigenvalue < threshold (directions generic keys do not use)
    Δ = R Kᵀ P (K Kᵀ P + K_p K_pᵀ P + αI)⁻¹

R (d_model, B), K (d_k, B) this batch's keys, K_p (d_k, n_p) keys of earlier batches. Since ΔW·k ≈ 0 for keys
in C0's span, preserved knowledge is left alone. Factors: A = R, B = (P (K Kᵀ + K_p K_pᵀ) + αI)⁻¹ P K.
"""

from __future__ import annotations

import torch


def nullspace_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """P (d_k, d_k), float64: projector on the span of C0's eigenvectors with eigenvalue < threshold."""
    values, vectors = torch.linalg.eigh(cov.double())
    small = vectors[:, values < threshold]
    return small @ small.T


def alphaedit_update(
    residual: torch.Tensor,
    keys: torch.Tensor,
    projector: torch.Tensor,
    previous_keys: torch.Tensor | None,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A (d_model, B), B (d_k, B)), float64. previous_keys: (d_k, n_p) or None."""
    k = keys.double()
    kk = k @ k.T
    if previous_keys is not None and previous_keys.numel():
        kp = previous_keys.double()
        kk = kk + kp @ kp.T
    p = projector.double()
    system = p @ kk + alpha * torch.eye(p.shape[0], dtype=torch.float64, device=p.device)
    return residual.double(), torch.linalg.solve(system, p @ k)
