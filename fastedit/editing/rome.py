"""ROME's rank-one update (one layer, one request; W is (d_model, d_k), keys are columns).

    ΔW = (v* − W k) (C⁻¹ k*)ᵀ / (kᵀ C⁻¹ k*),     C = λ·C0 + εI

k* is the context-averaged key, k the key at the bare prompt, so ΔW k = v* − W k exactly. λ cancels in the
ratio (it only matters against ε).
"""

from __future__ import annotations

import torch

from fastedit.editing.problem import LayerProblem, LayerUpdate
from fastedit.errors import FasteditError


def rome_update(problem: LayerProblem) -> LayerUpdate:
    """Factors (A = v* − W k (d_model, 1), B = C⁻¹k* / (kᵀC⁻¹k*) (d_k, 1))."""
    if problem.keys.shape[1] != 1 or problem.bare_keys is None:
        raise FasteditError("ROME edits one request at a time with its bare-prompt key")
    u = torch.linalg.solve(problem.cov.matrix, problem.keys)  # C⁻¹ k*, (d_k, 1)
    denom = (problem.bare_keys * u).sum(0)  # kᵀ C⁻¹ k*, (1,)
    return LayerUpdate(problem.residual, u / denom)
