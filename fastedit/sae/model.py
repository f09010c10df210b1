"""Sparse autoencoders on one hook point: ReLU + L1, TopK, and the three seed-paper variants.

Shapes: x (n, d_in) activations, z (n, d_sae) feature activations, x̂ = z W_dec + b_dec.
Weights follow SAELens: W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,).

* ``relu``: z = ReLU((x − b_dec) W_enc + b_enc); decoder rows kept at unit norm (renormalised after each step).
* ``topk``: the same pre-activation, keep the k largest per token (and ReLU them).
* ``factor`` (FactorSAE): W_dec = blockdiag(U_1..U_C) · [V_1ᵀ; ...; V_Cᵀ]: the d_sae features fall in C = 32
  clusters; cluster c's n_c features map through U_c (n_c × r) into its own rank-r subspace V_c (d_in × r),
  r = 128. The paper says "rank 128, 32 block-diagonal clusters" without fixing whether 128 is per cluster or
  total; a total of 128 would cap the reconstruction at a 128-dim subspace of the residual, so we use r per
  cluster. The encoder has its own factors of the same shape. Orthogonality of each V_c is pushed by a
  penalty and restored by a periodic SVD (see `train.py`).
* ``featureforget``: a dense SAE whose activation is gated: z_i = σ(g_i) · a_i · 1[a_i > τ_i], with learned gate
  logits g and adaptive thresholds τ_i = β·mean_i + (1−β)·std_i of feature i's activation (running statistics,
  updated in training only, phase 2).
* ``hiercontrastive``: a dense SAE plus cluster structure and importance tracking (in `train.py`); pruned
  features carry ``alive = 0`` and never fire.

The three variants use TopK as their base activation by default (``activation`` in the config), so that their
reconstruction matches the TopK baseline at the same L0 and the comparison isolates their extra objectives;
``activation="relu"`` gives the papers' ReLU + L1 (λ 0.04).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ARCHS = ("relu", "topk", "factor", "featureforget", "hiercontrastive")


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE; saved into ``cfg.json`` next to the SAELens keys."""

    d_in: int
    d_sae: int
    arch: str = "topk"
    activation: str = "topk"  # "relu" (+ L1) or "topk"
    k: int = 32
    n_clusters: int = 32
    rank: int = 128  # per-cluster rank of the factor variant
    gate_beta: float = 0.9  # featureforget: τ = β·mean + (1−β)·std


class SAE(nn.Module):
    """One SAE; `encode`, `decode`, `forward` work on (..., d_in) tensors in the raw activation space."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown SAE arch {cfg.arch!r}; choose one of {', '.join(ARCHS)}")
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # `scale`: activations are divided by it before encoding (training-time normalisation, folded on save).
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("alive", torch.ones(d_sae))
        self.threshold: torch.Tensor | None = None  # JumpReLU thresholds of loaded SAELens SAEs
        if cfg.arch == "factor":
            c = cfg.n_clusters
            if d_sae % c:
                raise ValueError(f"factor SAE: width {d_sae} is not a multiple of {c} clusters")
            n, r = d_sae // c, min(cfg.rank, d_in)
            self.U_dec = nn.Parameter(torch.randn(c, n, r) / r**0.5)
            self.V_dec = nn.Parameter(torch.linalg.qr(torch.randn(c, d_in, r))[0])
            self.U_enc = nn.Parameter(torch.randn(c, n, r) / r**0.5)
            self.V_enc = nn.Parameter(torch.linalg.qr(torch.randn(c, d_in, r))[0])
        else:
            w = torch.randn(d_sae, d_in)
            w = w / w.norm(dim=1, keepdim=True)
            self.W_dec = nn.Parameter(w.clone())
            self.W_enc = nn.Parameter(w.T.clone())
        if cfg.arch == "featureforget":
            self.gate = nn.Parameter(torch.full((d_sae,), 3.0))  # σ(3) ≈ 0.95: gates start open
            self.register_buffer("tau", torch.zeros(d_sae))
            self.register_buffer("act_mean", torch.zeros(d_sae))
            self.register_buffer("act_sq", torch.zeros(d_sae))
            self.gating = False  # switched on in training phase 2

    @property
    def device(self) -> torch.device:
        return self.b_dec.device

    def on_activations(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of a model activation h (..., d_in) wherever h lives: computed on the SAE's device in
        float32, the reconstruction returned on h's device and dtype, the features z on the SAE's device."""
        x_hat, z = self(h.to(self.device, torch.float32))
        return x_hat.to(h.device, h.dtype), z

    # ---- weights --------------------------------------------------------------------------------------
    def decoder(self) -> torch.Tensor:
        """W_dec (d_sae, d_in) in the normalised space."""
        if self.cfg.arch == "factor":
            return torch.einsum("cnr,cdr->cnd", self.U_dec, self.V_dec).reshape(self.cfg.d_sae, self.cfg.d_in)
        return self.W_dec

    def encoder(self) -> torch.Tensor:
        """W_enc (d_in, d_sae) in the normalised space."""
        if self.cfg.arch == "factor":
            return torch.einsum("cnr,cdr->cnd", self.U_enc, self.V_enc).reshape(self.cfg.d_sae, self.cfg.d_in).T
        return self.W_enc

    # ---- forward --------------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(x/scale − b_dec) W_enc + b_enc: (..., d_sae)."""
        xn = x / self.scale - self.b_dec
        if self.cfg.arch == "factor":
            # Factored product: (.., d) -> (.., c, r) -> (.., c, n): cheaper than materialising W_enc.
            low = torch.einsum("...d,cdr->...cr", xn, self.V_enc)
            pre = torch.einsum("...cr,cnr->...cn", low, self.U_enc).reshape(*x.shape[:-1], self.cfg.d_sae)
        else:
            pre = xn @ self.W_enc
        return pre + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:  # JumpReLU (loaded SAELens SAEs)
            z = pre * (pre > self.threshold)
        elif self.cfg.activation == "topk":
            # Pruned features (alive = 0) take no top-k slot: the k go to live features, as in the exported
            # SAELens weights (b_enc = −1e4 for pruned features).
            pre = pre.masked_fill(self.alive == 0, float("-inf"))
            vals, idx = pre.topk(min(self.cfg.k, pre.shape[-1]), dim=-1)
            z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        else:
            z = torch.relu(pre)
        if self.cfg.arch == "featureforget" and self.gating:
            z = torch.sigmoid(self.gate) * z * (z > self.tau)
        return z * self.alive

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x̂ in the raw space: (z W_dec + b_dec) · scale."""
        if self.cfg.arch == "factor":
            zc = z.reshape(*z.shape[:-1], self.cfg.n_clusters, -1)
            low = torch.einsum("...cn,cnr->...cr", zc, self.U_dec)
            out = torch.einsum("...cr,cdr->...d", low, self.V_dec)
        else:
            out = z @ self.W_dec
        return (out + self.b_dec) * self.scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    def decoder_norms(self) -> torch.Tensor:
        """‖d_i‖ in the raw space (d_sae,): the residual-space size of one unit of feature i."""
        return self.decoder().norm(dim=1) * self.scale

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Unit-norm decoder rows (ReLU + L1 needs it, or L1 is cheated by shrinking z and growing W_dec)."""
        if self.cfg.arch != "factor":
            self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)
