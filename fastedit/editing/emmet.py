"""EMMET: memorise every edit as an equality constraint, preserve C0's keys in least squares.

    min_Δ tr(Δ C Δᵀ)  s.t.  (W + Δ) K_E = V_E     ⇒     Δ = R (K_Eᵀ C⁻¹ K_E)⁻¹ K_Eᵀ C⁻¹,   C = λC0 + εI
                                                                          (+ w·K_t K_tᵀ, `LayerProblem.preserved`)

R (d_model, B), K_E (d_k, B), B ≤ d_k. The B constraints hold exactly: ΔW K_E = R (the residual
‖ΔW K_E − R‖/‖R‖ is reported). Solved stably: with C = L Lᵀ and X = L⁻¹ K_E = Q T (thin QR),
C⁻¹K_E (K_Eᵀ C⁻¹ K_E)⁻¹ = L⁻ᵀ Q T⁻ᵀ, so the B×B Gram matrix (condition number squared) is never formed.
Keys that coincide (the same subject twice) cannot take two values: T is then singular, and the rows it
cannot honour are solved in least squares (pseudo-inverse of T), which the residual shows.

With a regulariser μ > 0 the update is R (K_Eᵀ C⁻¹ K_E + μI)⁻¹ K_Eᵀ C⁻¹, which the Woodbury identity turns into
R (I + K_Eᵀ (μC)⁻¹ K_E)⁻¹ K_Eᵀ (μC)⁻¹ = MEMIT's update at λ·μ (and ε·μ): not EMMET. It is kept for
comparisons only and logged as what it is.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from fastedit.editing.memit import memit_update
from fastedit.editing.problem import LayerProblem, LayerUpdate
from fastedit.errors import FasteditError

log = logging.getLogger(__name__)

RANK_TOL = 1e-10  # singular values of T below this fraction of the largest are dropped (coinciding keys)


def emmet_update(problem: LayerProblem) -> LayerUpdate:
    k, r, mu = problem.keys, problem.residual, problem.hp.emmet_mu
    n, d_k = k.shape[1], k.shape[0]
    if mu > 0:
        lam = problem.cov.lam * mu
        log.warning("emmet_mu %g > 0 is MEMIT at λ·μ = %g, not EMMET's equality-constrained update", mu, lam)
        w = problem.hp.template_neighbours_weight * mu  # every term of C scales by μ
        update = memit_update(
            replace(problem, cov=problem.cov.rescaled(lam), hp=problem.hp.replace(template_neighbours_weight=w))
        )
        update.info["equivalent_memit_lambda"] = problem.cov.lam * mu
    else:
        if n > d_k:
            raise FasteditError(
                f"EMMET needs at most d_k = {d_k} requests per batch for its equality constraints, got {n}; "
                "lower --batch-size"
            )
        chol = torch.linalg.cholesky(problem.preserved())  # C = L Lᵀ
        x = torch.linalg.solve_triangular(chol, k, upper=False)  # L⁻¹ K (d_k, B)
        q, t = torch.linalg.qr(x)  # (d_k, B), (B, B) upper triangular
        u, s, vh = torch.linalg.svd(t)
        keep = s > RANK_TOL * s[0]
        t_pinv_t = (u[:, keep] / s[keep]) @ vh[keep]  # (T⁻¹)ᵀ = T⁻ᵀ on the honoured rows, (B, B)
        b = torch.linalg.solve_triangular(chol.T, q @ t_pinv_t, upper=True)  # L⁻ᵀ Q T⁻ᵀ (d_k, B)
        update = LayerUpdate(r, b, {"dropped_constraints": int((~keep).sum())})
    made = r @ (update.b.T @ k)  # ΔW K = A (Bᵀ K)  (d_model, B)
    update.info["constraint_residual"] = float((made - r).norm() / r.norm().clamp_min(1e-30))
    return update
