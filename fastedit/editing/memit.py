"""MEMIT's batched least-squares update at one layer of the spread (W is (d_model, d_k), keys are columns).

    Δ_i = R_i K_iᵀ (C + K_i K_iᵀ)⁻¹,     C = λ C0 + εI (+ w·K_t K_tᵀ),     R_i = (Z − H_L) / (L − i)

R_i (d_model, B) is this layer's share of the residual still missing at the last edited layer, K_i (d_k, B)
the keys, K_t the optional template-neighbour keys (`LayerProblem.preserved`). Solved, never inverted:
X = (C + K Kᵀ)⁻¹ K, so ΔW = R Xᵀ (rank ≤ B).
"""

from __future__ import annotations

import torch

from fastedit.editing.problem import LayerProblem, LayerUpdate


def memit_update(problem: LayerProblem) -> LayerUpdate:
    k = problem.keys
    return LayerUpdate(problem.residual, torch.linalg.solve(problem.preserved() + k @ k.T, k))
