"""The covariance an editor solves against: raw C0 in, λ and a relative ε applied exactly once, on the
keys' device.

    C = λ·C0 + εI,   ε = rel_eps · λ · tr(C0) / d_k   (rel_eps relative to C0's mean eigenvalue)

Every rule takes its matrices from here, so λ cannot be applied twice and no rule solves against a singular
λ·C0 (d_m 1 gives a rank-deficient C0; ε keeps it invertible). The AlphaEdit null-space projector, an O(d_k³)
eigendecomposition, is computed once per covariance and threshold and kept.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fastedit.errors import FasteditError
from fastedit.stats.keystats import regularised

log = logging.getLogger(__name__)


class DegenerateNullSpaceError(FasteditError):
    """AlphaEdit's null space of C0 is empty or the whole space: the projected update would be 0 or unprojected."""


def solve_dtype(device: torch.device) -> torch.dtype:
    """float64 for every solve where the device has it (MPS does not), else float32."""
    return torch.float32 if device.type == "mps" else torch.float64


def as_c0(value: Any) -> torch.Tensor:
    """The raw C0 (d_k, d_k) of a tensor, a `KeyStats` or an `EditCovariance`."""
    if isinstance(value, torch.Tensor):
        return value
    matrix = getattr(value, "c0", None)
    matrix = getattr(value, "mean", None) if matrix is None else matrix
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise FasteditError(f"covariance must be a square C0 tensor or KeyStats, got {type(value).__name__}")
    return matrix


class EditCovariance:
    """One layer's C0 on the solve device/dtype, with the regularised matrix and cached projectors."""

    def __init__(self, c0: Any, *, lam: float, rel_eps: float, device: torch.device | str) -> None:
        raw = as_c0(c0)
        device = torch.device(device)
        self.dtype = solve_dtype(device)
        self.c0 = raw.to(device=device, dtype=self.dtype)
        self.lam, self.rel_eps = float(lam), float(rel_eps)
        self.matrix, self.eps = regularised(self.c0, self.lam, self.rel_eps)  # C = λC0 + εI (d_k, d_k)
        self._projectors: dict[float, torch.Tensor] = {}

    def rescaled(self, lam: float) -> EditCovariance:
        """The same C0 at another λ (ε follows, being relative)."""
        return EditCovariance(self.c0, lam=lam, rel_eps=self.rel_eps, device=self.c0.device)

    @property
    def d_k(self) -> int:
        return int(self.c0.shape[0])

    def nullspace_projector(self, rel_threshold: float) -> torch.Tensor:
        """P = U₀U₀ᵀ (d_k, d_k): eigenvectors of C0 whose eigenvalue is < rel_threshold · the largest.

        Relative, so its meaning does not depend on the keys' scale. An empty or full null space is an error:
        AlphaEdit would then make no edit, or an unprojected one.
        """
        if rel_threshold not in self._projectors:
            values, vectors = torch.linalg.eigh(self.c0)
            small = vectors[:, values < rel_threshold * values[-1].clamp_min(0)]
            dim = small.shape[1]
            if dim == 0 or dim == self.d_k:
                what = "empty" if dim == 0 else f"the whole space ({dim})"
                raise DegenerateNullSpaceError(
                    f"AlphaEdit's null space of C0 is {what} at nullspace_threshold {rel_threshold:g} (relative to "
                    f"C0's largest eigenvalue {float(values[-1]):.3g}); "
                    + ("raise" if dim == 0 else "lower")
                    + " nullspace_threshold in the hparams"
                )
            log.info("AlphaEdit null space: %d of %d dimensions", dim, self.d_k)
            self._projectors[rel_threshold] = small @ small.T
        return self._projectors[rel_threshold]
