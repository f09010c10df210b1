"""What every closed-form rule receives and returns, so the engine can keep one table of rules.

W is (d_model, d_k) and keys are columns. The engine builds one `LayerProblem` per edited layer and batch,
with every tensor already on the keys' device in float64 (``solve_dtype``), and gets back the low-rank factors
of ΔW = A Bᵀ plus a few JSON-ready diagnostics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fastedit.editing.covariance import EditCovariance
from fastedit.editing.hparams import EditHparams


@dataclass(frozen=True)
class LayerProblem:
    residual: torch.Tensor  # R (d_model, B): the change of W's output each key should produce
    keys: torch.Tensor  # K (d_k, B): the keys the change is asked at (context-averaged)
    cov: EditCovariance  # C0 of the layer with the λ and ε of the hparams
    hp: EditHparams
    previous_keys: torch.Tensor | None = None  # K_p (d_k, n_p): keys of earlier batches (AlphaEdit)
    bare_keys: torch.Tensor | None = None  # (d_k, B): keys at the bare prompt (ROME's denominator)
    template_keys: torch.Tensor | None = None  # K_t (d_k, n_t): other subjects in this batch's templates

    def template_term(self) -> torch.Tensor | None:
        """w·K_t K_tᵀ (d_k, d_k) with w = ``hp.template_neighbours_weight``, or None without template keys."""
        kt, w = self.template_keys, self.hp.template_neighbours_weight
        if kt is None or kt.numel() == 0 or w == 0:
            return None
        return w * (kt @ kt.T)

    def preserved(self) -> torch.Tensor:
        """C = λC0 + εI + w·K_t K_tᵀ (d_k, d_k): what the update must leave alone, weighted as in the closed forms;
        without template keys this is the covariance's own matrix."""
        term = self.template_term()
        return self.cov.matrix if term is None else self.cov.matrix + term


@dataclass
class LayerUpdate:
    a: torch.Tensor  # (d_model, r)
    b: torch.Tensor  # (d_k, r); ΔW = A Bᵀ
    info: dict[str, Any] = field(default_factory=dict)
