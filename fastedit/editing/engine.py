"""The editing engine: v* at the site, keys per layer, one closed-form rule, deltas applied in place.

``apply_edit`` edits the model and returns the low-rank factors of every layer's change (ΔW = A Bᵀ);
``compute_edit`` does the same and restores the weights. MEMIT/EMMET/AlphaEdit spread the residual over
``hparams.layers`` (layer i's delta is applied before layer i+1's keys are read); ROME edits one layer, one
request after the other. If anything fails midway, every edited weight is restored bit-exactly.

Post-MLP-norm families (Gemma 2/3, ``spec.post_mlp_norm``): W's output m reaches the residual only through
N(m) = g ⊙ m / rms(m). With ``hparams.post_norm = "per_layer"`` (the default) v* optimises one δ_i per edited
layer on m_i itself, with every norm in the loop, and layer i's closed form targets m_i + δ_i. "project"
optimises δ on the residual and maps each layer's share r to the change of m whose normed output comes nearest
to N(m) + r (``postnorm.py``); "ignore" and "output_site" are the baselines of issue 5.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastedit.arch import add_to_mlp_out, arch_for, mlp_out_param
from fastedit.config import config_to_dict
from fastedit.editing.alphaedit import alphaedit_update, nullspace_projector
from fastedit.editing.context import context_templates
from fastedit.editing.emmet import emmet_update
from fastedit.editing.hparams import METHODS, EditHparams, check_layers, load_hparams
from fastedit.editing.keys import compute_keys
from fastedit.editing.memit import memit_update
from fastedit.editing.postnorm import mlp_outputs, post_norm_gain, pre_norm_targets
from fastedit.editing.requests import EditRequest
from fastedit.editing.rome import rome_update
from fastedit.editing.subject import check_template
from fastedit.editing.values import ValueResult, compute_values, edit_site, site_start_layer
from fastedit.errors import ConfigError, FasteditError

log = logging.getLogger(__name__)


class EditFailedError(FasteditError):
    """An update could not be computed (e.g. a singular or non-finite covariance); the model was restored."""


@dataclass
class EditResult:
    deltas: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A (d_model, r), B (d_k, r)), ΔW = A Bᵀ
    info: dict[str, Any]  # per-request v* losses, steps, timings, method, resolved hparams (JSON-ready)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, d_k) keys (AlphaEdit's K_p)


def _resolve(model: torch.nn.Module, method: str, hparams: EditHparams | str | None) -> EditHparams:
    if method not in METHODS:
        raise ConfigError(f"unknown editing method {method!r}; choose one of {', '.join(METHODS)}")
    if hparams is None:
        return load_hparams(method, model)
    if not isinstance(hparams, EditHparams):
        return load_hparams(method, model, hparams)
    if hparams.method != method:
        raise ConfigError(f"hparams are for method {hparams.method!r}, not {method!r}")
    return hparams


def _check_inputs(
    model: torch.nn.Module, requests: Sequence[EditRequest], hp: EditHparams, stats: Mapping[int, torch.Tensor]
) -> None:
    spec = arch_for(model)
    check_layers(hp, spec.n_layers(model.config))
    if not requests:
        raise FasteditError("no edit requests given; pass at least one request")
    for req in requests:
        check_template(req.prompt, req.subject, req.case_id)
        if not req.target_new.strip():
            raise FasteditError(f"case {req.case_id}: target_new is empty; give a new target")
    d_k = spec.d_k(model.config)
    for layer in hp.layers:
        if layer not in stats:
            raise ConfigError(
                f"no covariance statistics for layer {layer} (have {sorted(stats)}); "
                "compute them for every edited layer (fastedit precompute)"
            )
        if tuple(stats[layer].shape) != (d_k, d_k):
            raise ConfigError(
                f"covariance of layer {layer} has shape {tuple(stats[layer].shape)}, this model needs ({d_k}, {d_k}); "
                "were the statistics computed for another model?"
            )


def _apply(model: torch.nn.Module, layer: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast the factors to float32 and add A Bᵀ (computed in float32, as a patch would) to W."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise EditFailedError(
            f"the update of layer {layer} is not finite; check the covariance statistics of that layer "
            "(singular or corrupted) or raise mom2_update_weight / ridge"
        )
    a32, b32 = a.float().contiguous(), b.float().contiguous()
    add_to_mlp_out(model, arch_for(model), layer, a32 @ b32.T)
    return a32, b32


def apply_edit(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    method: str,
    hparams: EditHparams | str | None = None,
    stats: Mapping[int, torch.Tensor],
    previous_keys: Mapping[int, torch.Tensor] | None = None,
    values: ValueResult | None = None,
) -> EditResult:
    """Edit ``model`` in place for ``requests``; on any error the weights are restored before it propagates.

    stats[layer]: C0 = mean(k kᵀ) (d_k, d_k) for every edited layer. previous_keys[layer]: (n_p, d_k) keys of
    earlier batches (AlphaEdit). hparams: an `EditHparams`, a file path, or None for the model's default file.
    values: v* targets computed earlier by `compute_values` on the same unedited model, requests and site
    (MEMIT/EMMET/AlphaEdit only; lets a λ sweep reuse the expensive optimisation).
    """
    hp = _resolve(model, method, hparams)
    _check_inputs(model, requests, hp, stats)
    spec = arch_for(model)
    snapshot = {layer: mlp_out_param(model, spec, layer).detach().clone() for layer in hp.layers}
    try:
        if method == "rome":
            return _rome(model, tokenizer, requests, hp, stats)
        return _spread(model, tokenizer, requests, method, hp, stats, previous_keys, values)
    except BaseException:
        restore_weights(model, snapshot)
        raise


def compute_edit(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    method: str,
    hparams: EditHparams | str | None = None,
    stats: Mapping[int, torch.Tensor],
    previous_keys: Mapping[int, torch.Tensor] | None = None,
) -> EditResult:
    """The deltas ``apply_edit`` would make, with the model left unedited afterwards."""
    spec = arch_for(model)
    hp = _resolve(model, method, hparams)
    check_layers(hp, spec.n_layers(model.config))
    snapshot = {layer: mlp_out_param(model, spec, layer).detach().clone() for layer in hp.layers}
    try:
        return apply_edit(
            model, tokenizer, requests, method=method, hparams=hp, stats=stats, previous_keys=previous_keys
        )
    finally:
        restore_weights(model, snapshot)


@torch.no_grad()
def restore_weights(model: torch.nn.Module, snapshot: Mapping[int, torch.Tensor]) -> None:
    spec = arch_for(model)
    for layer, weight in snapshot.items():
        mlp_out_param(model, spec, layer).copy_(weight)


def _contexts(model: torch.nn.Module, tokenizer: Any, hp: EditHparams) -> list[str]:
    return context_templates(model, tokenizer, seeds=hp.context_seeds, length=hp.context_length, seed=hp.context_seed)


def _base_info(method: str, hp: EditHparams, contexts: list[str], site: str) -> dict[str, Any]:
    return {"method": method, "hparams": config_to_dict(hp), "contexts": contexts, "site": site, "layers": {}}


def _spread(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    method: str,
    hp: EditHparams,
    stats: Mapping[int, torch.Tensor],
    previous_keys: Mapping[int, torch.Tensor] | None,
    values: ValueResult | None = None,
) -> EditResult:
    spec = arch_for(model)
    last = hp.layers[-1]
    site = edit_site(spec, hp)
    t0 = time.perf_counter()
    contexts = _contexts(model, tokenizer, hp)
    per_layer = isinstance(site, tuple)  # one target per edited layer's mlp_out output (post_norm="per_layer")
    if values is None:
        start = site_start_layer(spec, hp)
        values = compute_values(model, tokenizer, spec, requests, site=site, layer=start, contexts=contexts, hp=hp)
    elif len(values.info) != len(requests):
        raise FasteditError(f"{len(values.info)} precomputed v* targets for {len(requests)} requests")
    info = _base_info(method, hp, contexts, site)
    info["requests"] = values.info
    info["seconds_values"] = time.perf_counter() - t0
    deltas, keys_out = {}, {}
    t1 = time.perf_counter()
    for i, layer in enumerate(hp.layers):
        layer_info = info["layers"].setdefault(str(layer), {})
        if per_layer:  # layer i's own target m_i + δ_i, against its output now (earlier layers are edited)
            keys, _, current = compute_keys(model, tokenizer, spec, requests, layer, contexts, site=site[i])
            residual = values.targets[:, i] - current  # (B, d_model)
        else:
            keys, _, current = compute_keys(
                model, tokenizer, spec, requests, layer, contexts, site=site, site_layer=last
            )
            residual = (values.targets - current) / (len(hp.layers) - i)  # (B, d_model): this layer's share
        if spec.post_mlp_norm is not None and hp.post_norm == "project":
            # W's output passes the norm N(m) = g ⊙ m / rms(m) before the residual: ask W for the change of m
            # that brings N(m) nearest to N(m) + residual (postnorm.py); the rest is left to later layers.
            m = mlp_outputs(model, tokenizer, spec, requests, layer, contexts)
            wanted = residual
            residual, reached = pre_norm_targets(m, wanted, post_norm_gain(model, spec, layer))
            residual = residual.float()
            layer_info["reached"] = float(((reached * wanted).sum(1) / wanted.pow(2).sum(1).clamp_min(1e-30)).mean())
            layer_info["residual_wanted_norm"] = float(wanted.norm(dim=1).mean())
        cov = stats[layer]
        if method == "memit":
            a, b = memit_update(residual.T, keys.T, cov, hp.mom2_update_weight, hp.ridge)
        elif method == "emmet":
            a, b = emmet_update(residual.T, keys.T, cov, hp.mom2_update_weight, hp.ridge, hp.emmet_mu)
        else:
            prev = previous_keys.get(layer) if previous_keys else None
            projector = nullspace_projector(cov, hp.nullspace_threshold)
            a, b = alphaedit_update(residual.T, keys.T, projector, None if prev is None else prev.T, hp.alphaedit_l2)
            layer_info["nullspace_dim"] = int(torch.trace(projector).round())
        deltas[layer] = _apply(model, layer, a, b)
        keys_out[layer] = keys.detach()
        # realised share of the asked change: ⟨ΔW k_b, r_b⟩ / ‖r_b‖², ΔW k_b = A (Bᵀ k_b) (B, d_model)
        made = (deltas[layer][1].T @ keys.T.float()).T @ deltas[layer][0].T
        realised = (made * residual).sum(1) / residual.pow(2).sum(1).clamp_min(1e-30)
        layer_info.update(
            residual_norm=float(residual.norm(dim=1).mean()),
            key_norm=float(keys.norm(dim=1).mean()),
            realised=float(realised.mean()),
        )
    info["seconds_solve"] = time.perf_counter() - t1
    info["seconds"] = time.perf_counter() - t0
    return EditResult(deltas=deltas, info=info, keys=keys_out)


def _rome(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hp: EditHparams,
    stats: Mapping[int, torch.Tensor],
) -> EditResult:
    """Rank one per request, applied before the next request's v* and keys are computed (like the reference)."""
    spec = arch_for(model)
    layer = hp.layers[0]
    site = edit_site(spec, hp)
    t0 = time.perf_counter()
    contexts = _contexts(model, tokenizer, hp)
    info = _base_info("rome", hp, contexts, site)
    info["requests"] = []
    factors_a, factors_b, keys_out = [], [], []
    for req in requests:
        values = compute_values(model, tokenizer, spec, [req], site=site, layer=layer, contexts=contexts, hp=hp)
        key_star, key_bare, current = compute_keys(
            model, tokenizer, spec, [req], layer, contexts, site=site, site_layer=layer
        )
        residual = values.targets[0] - current[0]  # v* − W k at the bare prompt, (d_model,)
        a, b = rome_update(residual, key_star[0], key_bare[0], stats[layer], hp.mom2_update_weight, hp.ridge)
        a32, b32 = _apply(model, layer, a, b)
        factors_a.append(a32)
        factors_b.append(b32)
        keys_out.append(key_star.detach())
        info["requests"].extend(values.info)
    info["seconds"] = time.perf_counter() - t0
    deltas = {layer: (torch.cat(factors_a, dim=1), torch.cat(factors_b, dim=1))}
    return EditResult(deltas=deltas, info=info, keys={layer: torch.cat(keys_out)})
