"""AlphaEdit's null-space-projected update (for sequential batches).

    P = U₀ U₀ᵀ, U₀ = eigenvectors of C0 with eigenvalue < threshold · λ_max (directions generic keys do not use)
    ΔWᵀ = (P (K Kᵀ + K_p K_pᵀ) + αI)⁻¹ P K Rᵀ

R (d_model, B), K (d_k, B) this batch's keys, K_p (d_k, n_p) keys of earlier batches (with template-neighbour
keys, w·K_t K_tᵀ joins K_p K_pᵀ as a penalty: their projected part is kept small too). Multiplying the system by
(I − P) gives α(I − P)ΔWᵀ = 0, so ΔW = ΔW P: keys in C0's span are left alone, and the K_p K_pᵀ term asks
ΔW K_p ≈ 0, so earlier edits survive later batches. Factors: A = R, B = (P (K Kᵀ + K_p K_pᵀ) + αI)⁻¹ P K.

The penalty is soft: when this batch's projected keys lie close to earlier ones, ΔW K_p keeps a part of order
α/σ², σ the smallest singular value separating them. ``alphaedit_previous = "exact"`` instead takes
P' = P − Q Qᵀ, Q an orthonormal basis of P K_p: then P' K_p = P K_p − P K_p = 0 (Q lies in P's range), the same
argument gives ΔW = ΔW P', so ΔW K_p = 0 exactly, at the cost of rank(P K_p) null-space dimensions.
"""

from __future__ import annotations

import logging

import torch

from fastedit.editing.covariance import DegenerateNullSpaceError
from fastedit.editing.problem import LayerProblem, LayerUpdate

log = logging.getLogger(__name__)


def without_previous_keys(p: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """P − Q Qᵀ (d_k, d_k), Q an orthonormal basis of P K_p (K_p (d_k, n_p)); rank cut relative to the largest."""
    u, s, _ = torch.linalg.svd(p @ kp, full_matrices=False)
    q = u[:, s > s.max() * max(kp.shape) * torch.finfo(s.dtype).eps] if s.numel() and s.max() > 0 else u[:, :0]
    left = p - q @ q.T
    if int(torch.trace(left).round()) == 0:
        raise DegenerateNullSpaceError(
            f"AlphaEdit: the {q.shape[1]} earlier keys fill the whole null space ({int(torch.trace(p).round())} "
            'dimensions); raise nullspace_threshold or use alphaedit_previous "penalty"'
        )
    return left


def alphaedit_update(problem: LayerProblem) -> LayerUpdate:
    k, hp = problem.keys, problem.hp
    p = problem.cov.nullspace_projector(hp.nullspace_threshold)  # (d_k, d_k), cached per C0 and threshold
    kk = k @ k.T
    reachable = None  # (B,) ‖P k‖ before earlier keys are removed (exact mode)
    if problem.previous_keys is not None and problem.previous_keys.numel():
        kp = problem.previous_keys
        if hp.alphaedit_previous == "exact":
            reachable = (p @ k).norm(dim=0)
            p = without_previous_keys(p, kp)
        else:
            kk = kk + kp @ kp.T
    if (term := problem.template_term()) is not None:
        kk = kk + term
    pk = p @ k  # (d_k, B)
    # A key inside span(P K_p) (e.g. a fact an earlier batch edited, edited again) cannot move under exact
    # preservation: say so rather than return a near-zero edit silently.
    if reachable is not None and bool((lost := pk.norm(dim=0) < 1e-2 * reachable).any()):
        log.warning(
            "AlphaEdit (alphaedit_previous exact): %d of %d keys lie in the span of earlier batches' keys "
            "and stay (nearly) unedited; use alphaedit_previous \"penalty\" to let them change",
            int(lost.sum()), int(lost.numel()),
        )  # fmt: skip
    system = p @ kk
    system.diagonal().add_(hp.alphaedit_l2)
    b = torch.linalg.solve(system, pk)
    return LayerUpdate(problem.residual, b, {"nullspace_dim": int(torch.trace(p).round())})
