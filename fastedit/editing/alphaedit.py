"""AlphaEdit's null-space-projected update (for sequential batches).

    P = U₀ U₀ᵀ, U₀ = eigenvectors of C0 with eigenvalue < threshold · λ_max (directions generic keys do not use)
    ΔWᵀ = (P (K Kᵀ + K_p K_pᵀ) + αI)⁻¹ P K Rᵀ

R (d_model, B), K (d_k, B) this batch's keys, K_p (d_k, n_p) keys of earlier batches. Multiplying the system by
(I − P) gives α(I − P)ΔWᵀ = 0, so ΔW = ΔW P: keys in C0's span are left alone, and the K_p K_pᵀ term asks
ΔW K_p ≈ 0, so earlier edits survive later batches. Factors: A = R, B = (P (K Kᵀ + K_p K_pᵀ) + αI)⁻¹ P K.
"""

from __future__ import annotations

import torch

from fastedit.editing.problem import LayerProblem, LayerUpdate


def alphaedit_update(problem: LayerProblem) -> LayerUpdate:
    k, hp = problem.keys, problem.hp
    p = problem.cov.nullspace_projector(hp.nullspace_threshold)  # (d_k, d_k), cached per C0 and threshold
    kk = k @ k.T
    if problem.previous_keys is not None and problem.previous_keys.numel():
        kp = problem.previous_keys
        kk = kk + kp @ kp.T
    system = p @ kk
    system.diagonal().add_(hp.alphaedit_l2)
    b = torch.linalg.solve(system, p @ k)
    return LayerUpdate(problem.residual, b, {"nullspace_dim": int(torch.trace(p).round())})
