"""One trainer for every SAE architecture; the seed variants add their objectives through small hooks here.

Loss, in the normalised space (x/scale, scale = RMS of the activations so each dimension has unit scale):
    FVU  = Σ‖x − x̂‖² / Σ‖x − μ‖²                                    (1 − explained variance of the batch)
    L1   = λ · mean_n Σ_i z_i ‖d_i‖ / sqrt(mean‖x − μ‖²)               (ReLU activations only; scale-free)
    AuxK = FVU of the residual e = x − x̂ explained by the top-k_aux *dead* latents, × 1/32 (TopK activations)
Dead features (no firing in the last ``dead_window`` steps): AuxK for TopK; for ReLU, resampling to the
directions of badly reconstructed inputs every ``resample_every`` steps (Anthropic's recipe, simplified).

Variant objectives (see `SAE` for the architectures):
* factor: + ortho · mean_c ‖V_cᵀV_c − I‖²_F / r on encoder and decoder factors; every ``reorth_every`` steps an
  exact re-orthogonalisation V_c = A S Bᵀ → V_c ← A Bᵀ, U_c ← U_c B S Bᵀ (polar factor by SVD: x̂ unchanged);
  attribution = EMA_β(mean |z ⊙ ∂L/∂z|), β 0.9 (saved in sparsity.safetensors).
* featureforget: two phases. Phase 1 (first half of the steps) trains reconstruction only. Phase 2 clusters the
  features into 32 groups (k-means on unit decoder rows concatenated with their importance: the paper clusters
  "importance vectors" without defining them), switches on the learned gates and adaptive thresholds, and,
  when forget-text activations are given, adds the dual objective: reconstruction of forget activations plus
  ``separation`` · the mean retain activation of features weighted by their forget share (features that carry
  the forget topic are pushed to stay silent on retain text — what the unlearning protocol's retain filter needs).
* hiercontrastive: importance_i = EMA(0.35·act_i + 0.5·grad_i + 0.15·MI_i) (each term scaled to [0, 1]; MI is the
  mutual information between "feature i fires" and "token comes from forget text", 0 without forget text);
  32 clusters (k-means on decoder rows, cluster importance = mean member importance); in phase 2 with forget
  text a contrastive term −0.3·KL(p_forget ‖ p_retain) over the cluster activation distributions; at the end
  the 5% least important features are pruned (``alive`` = 0).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from fastedit.sae.model import ARCHS, SAE, SAEConfig

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """SAE training options (recorded in cfg.json). Defaults fit a 2-core CPU budget of a few minutes."""

    arch: str = "topk"
    width: int = 4096
    k: int = 32
    activation: str | None = None  # None: "relu" for arch relu, else "topk"
    l1: float = 0.04
    lr: float = 1e-3  # the papers' 3e-4 assumes millions of tokens; ~300 steps here need more (all archs alike)
    batch_size: int = 1024
    epochs: int = 3
    warmup_steps: int = 1000  # capped at 10% of the run
    buffer_size: int = 65_536
    dead_window: int = 200
    aux_k: int = 256
    aux_coef: float = 1 / 32
    resample_every: int = 500
    n_clusters: int = 32
    rank: int = 128
    ortho: float = 0.1
    reorth_every: int = 250
    attribution_beta: float = 0.9
    gate_beta: float = 0.9
    separation: float = 0.1
    kl_coef: float = 0.3
    prune_fraction: float = 0.05
    importance_weights: list[float] = field(default_factory=lambda: [0.35, 0.5, 0.15])
    importance_beta: float = 0.9
    seed: int = 0


@dataclass
class TrainResult:
    sae: SAE
    stats: dict[str, torch.Tensor]  # per-feature tensors for sparsity.safetensors
    log: dict[str, Any]


def _fvu(x: torch.Tensor, xh: torch.Tensor) -> torch.Tensor:
    return (x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-8)


def _kmeans(points: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Cluster labels (n,) of ``points`` (n, d) by Lloyd's algorithm from a seeded random start."""
    gen = torch.Generator().manual_seed(seed)
    k = min(k, len(points))
    centres = points[torch.randperm(len(points), generator=gen)[:k]].clone()
    labels = torch.zeros(len(points), dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(points, centres).argmin(1)
        for c in range(k):
            members = points[labels == c]
            if len(members):
                centres[c] = members.mean(0)
    return labels


class Trainer:
    """Train one SAE on batches of activations (raw space); variant objectives are methods named by arch."""

    def __init__(self, cfg: TrainConfig, d_in: int, sample: torch.Tensor, total_steps: int) -> None:
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown arch {cfg.arch!r}")
        torch.manual_seed(cfg.seed)
        activation = cfg.activation or ("relu" if cfg.arch == "relu" else "topk")
        self.cfg, self.total = cfg, max(total_steps, 1)
        self.sae = SAE(
            SAEConfig(
                d_in=d_in,
                d_sae=cfg.width,
                arch=cfg.arch,
                activation=activation,
                k=cfg.k,
                n_clusters=cfg.n_clusters,
                rank=cfg.rank,
                gate_beta=cfg.gate_beta,
            )
        )
        with torch.no_grad():
            # scale: RMS per dimension, so the normalised activations have E‖x‖² = d_in (SAELens' convention).
            self.sae.scale.fill_(float(sample.pow(2).mean().sqrt()))
            self.sae.b_dec.copy_((sample / self.sae.scale).median(0).values)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.step = 0
        d_sae = cfg.width
        self.last_fired = torch.zeros(d_sae, dtype=torch.long)
        self.fired = torch.zeros(d_sae)
        self.seen = 0
        self.attribution = torch.zeros(d_sae)
        self.act_ema = torch.zeros(d_sae)
        self.forget_act = torch.zeros(d_sae)
        self.retain_act = torch.zeros(d_sae)
        self.importance = torch.zeros(d_sae)
        self.clusters = torch.arange(d_sae) % cfg.n_clusters
        self.phase2 = False
        self.history: list[dict[str, float]] = []

    # ---- one step --------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        warm = min(self.cfg.warmup_steps, max(1, self.total // 10))
        decay_from = int(0.8 * self.total)  # linear decay over the last 20%
        f = min(1.0, (step + 1) / warm)
        if step > decay_from:
            f *= max(0.0, (self.total - step) / max(1, self.total - decay_from))
        return self.cfg.lr * f

    def train_step(self, x: torch.Tensor, forget: torch.Tensor | None = None) -> dict[str, float]:
        cfg, sae = self.cfg, self.sae
        if not self.phase2 and self.step >= self.total // 2 and cfg.arch in ("featureforget", "hiercontrastive"):
            self._start_phase2()
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        xn = x / sae.scale
        pre = sae.pre_acts(x)
        z = sae.activate(pre)
        z.retain_grad()
        xh = sae.decode(z) / sae.scale
        fvu = _fvu(xn, xh)
        loss = fvu
        out = {"fvu": float(fvu.detach())}
        if sae.cfg.activation == "relu":
            denom = (xn - xn.mean(0)).pow(2).sum(1).mean().sqrt()
            l1 = cfg.l1 * (z * sae.decoder().norm(dim=1)).sum(1).mean() / denom
            loss = loss + l1
            out["l1"] = float(l1.detach())
        dead = (self.step - self.last_fired) >= cfg.dead_window
        if sae.cfg.activation == "topk" and dead.any() and self.step >= cfg.dead_window:
            aux = self._aux_loss(xn, xh, pre, dead)
            loss = loss + cfg.aux_coef * aux
            out["aux"] = float(aux.detach())
        extra = getattr(self, f"_loss_{cfg.arch}", None)
        if extra is not None:
            loss = loss + extra(x, z, forget, out)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            fired = (z > 0).any(0)
            self.last_fired[fired] = self.step
            self.fired += (z > 0).float().sum(0)
            self.seen += len(z)
            if z.grad is not None:
                attr = (z * z.grad).abs().mean(0)
                b = cfg.attribution_beta
                self.attribution.mul_(b).add_((1 - b) * attr)
            self.act_ema.mul_(cfg.importance_beta).add_((1 - cfg.importance_beta) * z.mean(0))
            self._z_sq = z.pow(2).mean(0)  # per-feature second moment of this batch (featureforget's τ)
        if sae.cfg.activation == "relu" and sae.cfg.arch != "factor":
            sae.normalise_decoder()
        hook = getattr(self, f"_after_{cfg.arch}", None)
        if hook is not None:
            hook()
        if (
            sae.cfg.activation == "relu"
            and self.step > 0
            and self.step % cfg.resample_every == 0
            and self.step < 0.8 * self.total
        ):
            self._resample(xn, xh.detach(), dead)
        out["l0"] = float((z > 0).float().sum(1).mean())
        out["loss"] = float(loss.detach())
        self.step += 1
        return out

    # ---- dead features ---------------------------------------------------------------------------------
    def _aux_loss(self, xn: torch.Tensor, xh: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
        """AuxK (Gao et al. 2024): the top-k_aux dead latents must explain the residual error."""
        k_aux = min(self.cfg.aux_k, int(dead.sum()))
        masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        vals, idx = masked.topk(k_aux, dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        err = (xn - xh).detach()
        err_hat = z_aux @ self.sae.decoder()
        return (err - err_hat).pow(2).sum() / (err - err.mean(0)).pow(2).sum().clamp_min(1e-8)

    @torch.no_grad()
    def _resample(self, xn: torch.Tensor, xh: torch.Tensor, dead: torch.Tensor) -> None:
        """Point dead ReLU features at inputs the SAE reconstructs worst (probability ∝ loss²)."""
        sae = self.sae
        idx = dead.nonzero().flatten()
        if not len(idx) or sae.cfg.arch == "factor":
            return
        err = (xn - xh).pow(2).sum(1)
        pick = torch.multinomial(err.pow(2) + 1e-12, len(idx), replacement=True)
        dirs = xn[pick] - sae.b_dec
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
        alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if (~dead).any() else torch.tensor(1.0)
        sae.W_dec[idx] = dirs
        sae.W_enc[:, idx] = dirs.T * alive_norm * 0.2
        sae.b_enc[idx] = 0.0
        for p in (sae.W_dec, sae.W_enc, sae.b_enc):
            state = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    if p is sae.W_enc:
                        state[key][:, idx] = 0
                    else:
                        state[key][idx] = 0
        self.last_fired[idx] = self.step
        log.debug("resampled %d dead features at step %d", len(idx), self.step)

    # ---- factor ----------------------------------------------------------------------------------------
    def _loss_factor(self, x: torch.Tensor, z: torch.Tensor, forget: Any, out: dict[str, float]) -> torch.Tensor:
        sae = self.sae
        pen = 0.0
        for v in (sae.V_dec, sae.V_enc):
            r = v.shape[-1]
            gram = v.transpose(1, 2) @ v  # (C, r, r)
            eye = torch.eye(r)
            pen = pen + (gram - eye).pow(2).sum((1, 2)).mean() / r
        out["ortho"] = float(pen.detach())
        return self.cfg.ortho * pen

    @torch.no_grad()
    def _after_factor(self) -> None:
        if self.step % self.cfg.reorth_every:
            return
        sae = self.sae
        for u, v in ((sae.U_dec, sae.V_dec), (sae.U_enc, sae.V_enc)):
            a, s, bt = torch.linalg.svd(v, full_matrices=False)  # v = A S Bᵀ, (C, d, r)
            b = bt.transpose(1, 2)
            v.copy_(a @ bt)  # polar factor: orthonormal columns
            u.copy_(u @ b @ torch.diag_embed(s) @ bt)  # U ← U B S Bᵀ keeps U Vᵀ unchanged

    # ---- featureforget / hiercontrastive ---------------------------------------------------------------
    @torch.no_grad()
    def _start_phase2(self) -> None:
        self.phase2 = True
        dec = self.sae.decoder()
        dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        imp = self.act_ema / self.act_ema.max().clamp_min(1e-8)
        self.clusters = _kmeans(torch.cat([dec, imp[:, None]], 1), self.cfg.n_clusters, seed=self.cfg.seed)
        if self.cfg.arch == "featureforget":
            self.sae.gating = True
        log.info("phase 2 at step %d: %d clusters", self.step, int(self.clusters.max()) + 1)

    def _forget_terms(self, z: torch.Tensor, forget: torch.Tensor | None, out: dict[str, float]) -> torch.Tensor:
        """Reconstruction of forget activations (dual objective); updates forget/retain activity EMAs."""
        if forget is None or not self.phase2:
            return torch.zeros(())
        zf = self.sae.encode(forget)
        fh = self.sae.decode(zf) / self.sae.scale
        f_fvu = _fvu(forget / self.sae.scale, fh)
        with torch.no_grad():
            b = self.cfg.importance_beta
            self.forget_act.mul_(b).add_((1 - b) * zf.mean(0))
            self.retain_act.mul_(b).add_((1 - b) * z.mean(0))
        out["forget_fvu"] = float(f_fvu.detach())
        self._zf = zf
        return f_fvu

    def _loss_featureforget(
        self, x: torch.Tensor, z: torch.Tensor, forget: torch.Tensor | None, out: dict[str, float]
    ) -> torch.Tensor:
        loss = self._forget_terms(z, forget, out)
        if forget is not None and self.phase2:
            share = self.forget_act / (self.forget_act + self.retain_act).clamp_min(1e-8)  # (d_sae,) in [0, 1]
            sep = (z * share).sum(1).mean() / z.sum(1).mean().clamp_min(1e-8)
            out["separation"] = float(sep.detach())
            loss = loss + self.cfg.separation * sep
        return loss

    @torch.no_grad()
    def _after_featureforget(self) -> None:
        sae = self.sae
        if not self.phase2:
            return
        # τ = β·mean + (1−β)·std of each feature's activation, from running first and second moments.
        b = 0.99
        sae.act_mean.mul_(b).add_((1 - b) * self.act_ema)
        sae.act_sq.mul_(b).add_((1 - b) * self._z_sq)
        std = (sae.act_sq - sae.act_mean.pow(2)).clamp_min(0).sqrt()
        sae.tau.copy_((sae.cfg.gate_beta * sae.act_mean + (1 - sae.cfg.gate_beta) * std).clamp_min(0))

    def _loss_hiercontrastive(
        self, x: torch.Tensor, z: torch.Tensor, forget: torch.Tensor | None, out: dict[str, float]
    ) -> torch.Tensor:
        loss = self._forget_terms(z, forget, out)
        if forget is not None and self.phase2:
            n_c = int(self.clusters.max()) + 1
            onehot = torch.nn.functional.one_hot(self.clusters, n_c).float()  # (d_sae, C)
            p_f = (self._zf.mean(0) @ onehot) + 1e-6
            p_r = (z.mean(0) @ onehot) + 1e-6
            p_f, p_r = p_f / p_f.sum(), p_r / p_r.sum()
            kl = (p_f * (p_f / p_r).log()).sum()
            out["kl"] = float(kl.detach())
            loss = loss - self.cfg.kl_coef * kl.clamp(max=5.0)
            with torch.no_grad():
                self._mi = _firing_mi(z, self._zf)
        return loss

    @torch.no_grad()
    def _after_hiercontrastive(self) -> None:
        w = self.cfg.importance_weights
        act = self.act_ema / self.act_ema.max().clamp_min(1e-8)
        grad = self.attribution / self.attribution.max().clamp_min(1e-8)
        mi = getattr(self, "_mi", torch.zeros_like(act))
        mi = mi / mi.max().clamp_min(1e-8)
        b = self.cfg.importance_beta
        self.importance.mul_(b).add_((1 - b) * (w[0] * act + w[1] * grad + w[2] * mi))

    @torch.no_grad()
    def finish(self) -> None:
        """End-of-training steps: hiercontrastive prunes its least important features."""
        if self.cfg.arch == "hiercontrastive" and self.cfg.prune_fraction > 0:
            n = int(self.cfg.prune_fraction * self.sae.cfg.d_sae)
            self.sae.alive[self.importance.argsort()[:n]] = 0.0

    def stats(self) -> dict[str, torch.Tensor]:
        freq = self.fired / max(self.seen, 1)
        stats = {"sparsity": torch.log10(freq + 1e-10), "attribution": self.attribution.clone()}
        if self.cfg.arch in ("featureforget", "hiercontrastive"):
            stats["cluster"] = self.clusters.float()
            stats["forget_activity"] = self.forget_act.clone()
        if self.cfg.arch == "hiercontrastive":
            stats["importance"] = self.importance.clone()
        return stats


def _firing_mi(z_retain: torch.Tensor, z_forget: torch.Tensor) -> torch.Tensor:
    """Mutual information (nats) between "feature fires" and "token is from forget text", per feature."""
    n_r, n_f = len(z_retain), len(z_forget)
    n = n_r + n_f
    f1 = (z_forget > 0).float().sum(0)
    r1 = (z_retain > 0).float().sum(0)
    joint = torch.stack([torch.stack([r1, n_r - r1]), torch.stack([f1, n_f - f1])]) / n  # (label, fires, d)
    p_label = torch.tensor([n_r / n, n_f / n])[:, None, None]
    p_fire = joint.sum(0, keepdim=True)
    ratio = joint / (p_label * p_fire).clamp_min(1e-12)
    return (joint * ratio.clamp_min(1e-12).log()).sum((0, 1))


def train_on_batches(
    cfg: TrainConfig,
    batches: Callable[[], Iterator[torch.Tensor]],
    sample: torch.Tensor,
    total_steps: int,
    forget: torch.Tensor | None = None,
) -> TrainResult:
    """Run the trainer over ``batches()``; ``forget`` (n, d_in) feeds the variants' dual objectives."""
    trainer = Trainer(cfg, sample.shape[1], sample.float(), total_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    for batch in batches():
        fb = None
        if forget is not None and len(forget):
            fb = forget[torch.randint(len(forget), (min(len(forget), cfg.batch_size // 4),), generator=gen)].float()
        last = trainer.train_step(batch, fb)
        if trainer.step % 100 == 0:
            log.info("step %d/%d %s", trainer.step, total_steps, {k: round(v, 4) for k, v in last.items()})
            trainer.history.append({"step": trainer.step, **last})
        if trainer.step >= total_steps:
            break
    trainer.finish()
    trainer.sae.eval().requires_grad_(False)
    return TrainResult(
        trainer.sae,
        trainer.stats(),
        {"steps": trainer.step, "seconds": round(time.perf_counter() - t0, 1), "final": last, "curve": trainer.history},
    )


def steps_for(tokens: int, cfg: TrainConfig) -> int:
    return max(1, math.floor(tokens * cfg.epochs / cfg.batch_size))
