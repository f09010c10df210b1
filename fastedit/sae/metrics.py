"""SAE quality: L0, explained variance, dead features, and CE-loss recovered with the SAE spliced into the model.

    EV           = 1 − Σ‖x − x̂‖² / Σ‖x − μ‖²
    CE recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean)   (SAELens convention: zero-ablation baseline)
BOS positions are left untouched when splicing (they are not SAE inputs; see `activations.py`).
"""

from __future__ import annotations

from typing import Any

import torch

from fastedit.arch import edit_output, model_device
from fastedit.sae.activations import bos_id, hook_path, token_windows
from fastedit.sae.model import SAE


@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """L0, explained variance, MSE and dead fraction of ``sae`` on activations (n, d_in)."""
    acts = acts.float()
    mu = acts.mean(0)
    err = tot = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, len(acts), batch):
        x = acts[i : i + batch]
        xh, z = sae(x)
        err += float((x - xh).pow(2).sum())
        tot += float((x - mu).pow(2).sum())
        l0 += float((z > 0).sum())
        fired |= (z > 0).any(0)
    n = len(acts)
    return {
        "explained_variance": 1 - err / max(tot, 1e-12),
        "l0": l0 / n,
        "mse": err / (n * acts.shape[1]),
        "dead_fraction": 1 - float(fired.float().mean()),
        "tokens": n,
    }


def _ce(model: torch.nn.Module, ids: torch.Tensor, first: int) -> float:
    """Mean next-token cross-entropy over positions ≥ ``first`` (skip predicting from BOS)."""
    ids = ids.to(model_device(model))
    logits = model(input_ids=ids).logits[:, first:-1].float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, first + 1 :].flatten()))


@torch.no_grad()
def ce_recovered(
    model: torch.nn.Module,
    tokenizer: Any,
    sae: SAE,
    text: str,
    layer: int,
    *,
    site: str = "resid_post",
    context: int = 128,
    n_windows: int = 8,
) -> dict[str, float]:
    """CE clean / with the SAE reconstruction spliced in / with the hook zero-ablated, and the share recovered."""
    name = hook_path(model, layer, site)
    ids, _ = token_windows(tokenizer, text, context, n_windows * context)
    ids = ids[:n_windows]
    skip = 1 if bos_id(tokenizer) is not None else 0

    def splice(h: torch.Tensor) -> torch.Tensor:
        out = sae.on_activations(h)[0]
        out[:, :skip] = h[:, :skip]
        return out

    def zero(h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(h)
        out[:, :skip] = h[:, :skip]
        return out

    clean = _ce(model, ids, skip)
    with edit_output(model, name, splice):
        spliced = _ce(model, ids, skip)
    with edit_output(model, name, zero):
        zeroed = _ce(model, ids, skip)
    return {
        "ce_clean": clean,
        "ce_sae": spliced,
        "ce_zero_ablation": zeroed,
        "ce_recovered": (zeroed - spliced) / (zeroed - clean) if zeroed != clean else float("nan"),
    }
