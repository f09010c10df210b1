"""`KeyStats`: one layer's key second moment C0 = (1/N) Σ k kᵀ, and the regularised C = λ·C0 + εI editors use."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

# Default ridge, relative to the mean eigenvalue of λ·C0: ε = DEFAULT_REL_EPS · λ · tr(C0) / d_k.
# Small enough not to bias a well-conditioned C0 (d_m >= 2), large enough to keep a rank-deficient one
# (d_m < 1, dead units) invertible in float64.
DEFAULT_REL_EPS = 1e-6


def regularised(c0: torch.Tensor, lam: float, rel_eps: float = DEFAULT_REL_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, ε): C = λ·C0 + εI with ε = rel_eps · λ · tr(C0)/d_k (a 0-d tensor, on c0's device: no host sync),
    in c0's dtype and device. The one place the editors' regularisation is written down."""
    eps = rel_eps * lam * torch.diagonal(c0).mean()
    cov = c0 * lam
    cov.diagonal().add_(eps)
    return cov, eps


@dataclass
class KeyStats:
    """One layer's key second moment. ``mean``: C0 = (1/N) Σ k kᵀ, float64, (d_k, d_k); ``count``: N."""

    layer: int
    mean: torch.Tensor
    count: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def d_k(self) -> int:
        return int(self.mean.shape[0])

    def covariance(self, lam: float = 1.0, rel_eps: float = DEFAULT_REL_EPS) -> torch.Tensor:
        """C = λ·C0 + εI in float64 (d_k, d_k), ε relative (`regularised`). For inspection: the editors take
        the raw statistics and apply their hparams' λ and ε themselves."""
        return regularised(self.mean.to(torch.float64), lam, rel_eps)[0]

    def condition_number(self, eps: float = 0.0) -> float:
        """κ(C0 + εI) = λ_max / λ_min from the eigenvalues (float64); inf when C0 is singular."""
        return condition_number(self.mean, eps)


def condition_number(matrix: torch.Tensor, eps: float = 0.0) -> float:
    """κ = λ_max / λ_min of a symmetric PSD matrix (+ εI), float64; inf when it is singular.

    Exact eigenvalues up to d = EXACT_COND_DIM; beyond, subspace iteration (on C for λ_max, on C⁻¹ through a
    Cholesky factor for λ_min) with Rayleigh-Ritz: O(d²) per step instead of the O(d³) eigensolver, which takes
    seconds at d_k 2048 and minutes at d_k 11008.
    """
    mat = matrix.to(torch.float64)
    if eps:
        mat = mat + eps * torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
    if mat.shape[0] <= EXACT_COND_DIM:
        eig = torch.linalg.eigvalsh(mat)
        return float(eig[-1] / eig[0]) if eig[0] > 0 else float("inf")
    chol, info = torch.linalg.cholesky_ex(mat)
    if int(info) != 0:  # not positive definite in float64
        return float("inf")
    gen = torch.Generator(device="cpu").manual_seed(0)
    block = torch.randn(mat.shape[0], COND_BLOCK, dtype=mat.dtype, generator=gen).to(mat.device)
    hi = _ritz_extreme(lambda x: mat @ x, mat, block, largest=True)
    lo = _ritz_extreme(lambda x: torch.cholesky_solve(x, chol), mat, block, largest=False)
    return hi / lo if lo > 0 else float("inf")


EXACT_COND_DIM = 1024
COND_BLOCK = 16
COND_ITERS = 60


def _ritz_extreme(
    apply: Callable[[torch.Tensor], torch.Tensor], mat: torch.Tensor, x: torch.Tensor, largest: bool
) -> float:
    """Extreme eigenvalue of ``mat`` by subspace iteration with ``apply`` (mat or its inverse), until stable."""
    prev = None
    for _ in range(COND_ITERS):
        x, _ = torch.linalg.qr(apply(x))
        ritz = torch.linalg.eigvalsh(x.T @ mat @ x)  # Rayleigh-Ritz values of mat on the subspace
        value = float(ritz[-1] if largest else ritz[0])
        if prev is not None and abs(value - prev) <= 1e-7 * abs(value):
            break
        prev = value
    return value
