"""The editing engine: v* at the site, keys per layer, one closed-form rule, deltas applied in place.

``apply_edit`` edits the model and returns the low-rank factors of every layer's change (ΔW = A Bᵀ);
``compute_edit`` does the same and restores the weights; ``compute_targets`` runs only the v* optimisation, so
several editors or a λ grid can share it (``apply_edit(..., values=targets)``). MEMIT/EMMET/AlphaEdit spread
the residual over ``hparams.layers`` (layer i's delta is applied before layer i+1's keys are read); ROME edits
one layer, one request after the other. If anything fails midway, every edited weight is restored bit-exactly.

Every rule sees the same `LayerProblem` (``RULES``): residual and keys as columns, the layer's C0 moved once to
the edited weight's device in float64 (``EditCovariance``: C = λ·C0 + εI, λ and the relative ε applied there
and nowhere else).

Post-MLP-norm families (Gemma 2/3, ``spec.post_mlp_norm``): W's output m reaches the residual only through
N(m) = g ⊙ m / rms(m). With ``hparams.post_norm = "per_layer"`` (the default) v* optimises one δ_i per edited
layer on m_i itself, with every norm in the loop; layer i's closed form targets the value site i had in the
final optimised forward (every δ applied, so the shift that δ_<i causes upstream is part of it). "project"
optimises δ on the residual and maps each layer's share r to the change of m whose normed output comes nearest
to N(m) + r (``postnorm.py``); "ignore" and "output_site" are kept as baselines for the norm study.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastedit.arch import add_to_mlp_out, arch_for, mlp_out_param, restored_after, restored_on_error
from fastedit.config import config_to_dict
from fastedit.editing.alphaedit import alphaedit_update
from fastedit.editing.context import context_templates
from fastedit.editing.covariance import EditCovariance, as_c0
from fastedit.editing.emmet import emmet_update
from fastedit.editing.hparams import METHODS, EditHparams, check_layers, load_hparams
from fastedit.editing.keys import compute_keys
from fastedit.editing.memit import memit_update
from fastedit.editing.postnorm import mlp_outputs, post_norm_gain, pre_norm_targets
from fastedit.editing.problem import LayerProblem, LayerUpdate
from fastedit.editing.rome import rome_update
from fastedit.editing.subject import check_template
from fastedit.editing.template_neighbours import template_neighbour_keys
from fastedit.editing.values import (
    ValueResult,
    compute_values,
    edit_site,
    site_start_layer,
    values_key,
)
from fastedit.errors import ConfigError, FasteditError
from fastedit.requests import EditRequest
from fastedit.stats.distributed import all_gather_objects

log = logging.getLogger(__name__)

# One rule per method, all with the same signature; METHODS (hparams.py) is the one list of method names.
RULES: dict[str, Callable[[LayerProblem], LayerUpdate]] = {
    "rome": rome_update,
    "memit": memit_update,
    "emmet": emmet_update,
    "alphaedit": alphaedit_update,
}
assert tuple(RULES) == METHODS


class EditFailedError(FasteditError):
    """An update could not be computed (e.g. a singular or non-finite covariance); the model was restored."""


@dataclass
class EditResult:
    deltas: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (A (d_model, r), B (d_k, r)), ΔW = A Bᵀ
    info: dict[str, Any]  # per-request v* losses, steps, timings, method, resolved hparams (JSON-ready)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, d_k) keys (AlphaEdit's K_p)


def resolve_hparams(model: torch.nn.Module, method: str, hparams: EditHparams | str | None) -> EditHparams:
    """``hparams`` as loaded `EditHparams` for ``method``: None = the model's default file, or a file path."""
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
    model: torch.nn.Module, requests: Sequence[EditRequest], hp: EditHparams, stats: Mapping[int, Any]
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
        value = stats[layer]
        matrix = as_c0(value)
        if tuple(matrix.shape) != (d_k, d_k):
            raise ConfigError(
                f"covariance of layer {layer} has shape {tuple(matrix.shape)}, this model needs ({d_k}, {d_k}); "
                "were the statistics computed for another model?"
            )


def prepare_covariances(model: torch.nn.Module, stats: Mapping[int, Any], hp: EditHparams) -> dict[int, EditCovariance]:
    """Each edited layer's C0 (tensor, `KeyStats` or `EditCovariance`) on its weight's device with the hparams'
    λ and ε. Prepared objects that already match are reused, so AlphaEdit's projector is computed once per run."""
    spec = arch_for(model)
    out = {}
    for layer in hp.layers:
        value, device = stats[layer], mlp_out_param(model, spec, layer).device
        fits = (
            isinstance(value, EditCovariance)
            and value.lam == hp.mom2_update_weight
            and value.rel_eps == hp.rel_eps
            and value.c0.device == device
        )
        out[layer] = value if fits else EditCovariance(
            as_c0(value),
            lam=hp.mom2_update_weight, rel_eps=hp.rel_eps, device=device,
        )  # fmt: skip
    return out


def solve_layer(method: str, problem: LayerProblem) -> LayerUpdate:
    """One layer's update by ``method``'s rule, checked finite, with the realised share of the asked change:
    ⟨ΔW k_b, r_b⟩ / ‖r_b‖² averaged over the batch (1 = every key gets exactly its residual)."""
    update = RULES[method](problem)
    if not (torch.isfinite(update.a).all() and torch.isfinite(update.b).all()):
        raise EditFailedError(
            "the update is not finite; check the covariance statistics of that layer "
            "(singular or corrupted) or raise mom2_update_weight / rel_eps"
        )
    r, k = problem.residual, problem.keys
    made = update.a @ (update.b.T @ k)  # ΔW K (d_model, B)
    realised = (made * r).sum(0) / r.pow(2).sum(0).clamp_min(1e-30)
    update.info.update(
        realised=float(realised.mean()),
        residual_norm=float(r.norm(dim=0).mean()),
        key_norm=float(k.norm(dim=0).mean()),
    )
    return update


def _problem(
    cov: EditCovariance,
    hp: EditHparams,
    residual: torch.Tensor,
    keys: torch.Tensor,
    previous_keys: torch.Tensor | None = None,
    bare_keys: torch.Tensor | None = None,
    template_keys: torch.Tensor | None = None,
) -> LayerProblem:
    """Rows (B, width) from the model → columns on the covariance's device and dtype."""
    col = lambda x: None if x is None else x.T.to(device=cov.c0.device, dtype=cov.dtype)  # noqa: E731
    return LayerProblem(col(residual), col(keys), cov, hp, col(previous_keys), col(bare_keys), col(template_keys))


def _apply(model: torch.nn.Module, layer: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast the factors to float32 and add A Bᵀ (computed in float32, as a patch would) to W."""
    a32, b32 = a.float().contiguous(), b.float().contiguous()
    add_to_mlp_out(model, arch_for(model), layer, a32 @ b32.T)
    return a32, b32


def compute_targets(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    method: str = "memit",
    hparams: EditHparams | str | None = None,
) -> ValueResult:
    """The v* targets ``apply_edit`` would optimise, for reuse: every method and λ whose v* settings and site
    are the same (``ValueResult.key``) can be handed them with ``apply_edit(..., values=...)``. Under torchrun
    (or ``fastedit edit --workers``) the requests are split across the ranks and every rank gets all targets."""
    spec = arch_for(model)
    hp = resolve_hparams(model, method, hparams)
    check_layers(hp, spec.n_layers(model.config))
    for req in requests:
        check_template(req.prompt, req.subject, req.case_id)
    # Rank 0's sampled prefixes on every rank (sampling on different devices need not agree): one set of targets.
    contexts = all_gather_objects(_contexts(model, tokenizer, hp))[0]
    site = edit_site(spec, hp)
    start = site_start_layer(spec, hp)
    values = compute_values(
        model, tokenizer, spec, requests, site=site, layer=start, contexts=contexts, hp=hp, across_ranks=True
    )
    values.contexts, values.key = list(contexts), values_key(spec, hp)
    return values


def apply_edit(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    method: str,
    hparams: EditHparams | str | None = None,
    stats: Mapping[int, Any],
    previous_keys: Mapping[int, torch.Tensor] | None = None,
    values: ValueResult | None = None,
) -> EditResult:
    """Edit ``model`` in place for ``requests``; on any error the weights are restored before it propagates.

    stats[layer]: C0 = mean(k kᵀ) (d_k, d_k) — a tensor, `KeyStats` or `EditCovariance` — for every edited
    layer, raw: λ and ε come from the hparams. previous_keys[layer]: (n_p, d_k) keys of earlier batches
    (AlphaEdit). hparams: an `EditHparams`, a file path, or None for the model's default file. values: targets
    from `compute_targets` on the same unedited model and requests (MEMIT/EMMET/AlphaEdit; checked to match).
    """
    hp = resolve_hparams(model, method, hparams)
    _check_inputs(model, requests, hp, stats)
    spec = arch_for(model)
    if values is not None:
        if method == "rome":
            raise ConfigError("ROME recomputes v* after every request; it cannot take precomputed targets")
        if values.key and values.key != values_key(spec, hp):
            raise ConfigError(
                "the precomputed v* targets were made with other v* settings or edit site than these hparams; "
                "compute them with the same hparams (compute_targets)"
            )
        if len(values.info) != len(requests):
            raise FasteditError(f"{len(values.info)} precomputed v* targets for {len(requests)} requests")
    covs = prepare_covariances(model, stats, hp)
    with restored_on_error(model, spec, hp.layers):
        if method == "rome":
            return _rome(model, tokenizer, requests, hp, covs)
        return _spread(model, tokenizer, requests, method, hp, covs, previous_keys, values)


def compute_edit(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    method: str,
    hparams: EditHparams | str | None = None,
    stats: Mapping[int, Any],
    previous_keys: Mapping[int, torch.Tensor] | None = None,
    values: ValueResult | None = None,
) -> EditResult:
    """The deltas ``apply_edit`` would make, with the model left unedited afterwards."""
    spec = arch_for(model)
    hp = resolve_hparams(model, method, hparams)
    check_layers(hp, spec.n_layers(model.config))
    with restored_after(model, spec, hp.layers):
        return apply_edit(
            model, tokenizer, requests, method=method, hparams=hp, stats=stats, previous_keys=previous_keys,
            values=values,
        )  # fmt: skip


def _contexts(model: torch.nn.Module, tokenizer: Any, hp: EditHparams) -> list[str]:
    return context_templates(model, tokenizer, seeds=hp.context_seeds, length=hp.context_length, seed=hp.context_seed)


def _base_info(method: str, hp: EditHparams, contexts: list[str], site: Any) -> dict[str, Any]:
    return {"method": method, "hparams": config_to_dict(hp), "contexts": contexts, "site": site, "layers": {}}


def _layer_residual(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hp: EditHparams,
    values: ValueResult,
    contexts: list[str],
    i: int,
    layer_info: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys (B, d_k), residual (B, d_model)): what layer ``hp.layers[i]`` is asked to add to W's output now
    that the layers before it are edited."""
    spec = arch_for(model)
    site, layer = edit_site(spec, hp), hp.layers[i]
    if isinstance(site, tuple):  # per-layer targets on each mlp_out output: z_i − m_i(edited layers below)
        keys, _, current = compute_keys(
            model, tokenizer, spec, requests, layer, contexts, site=site[i], across_ranks=True
        )
        return keys, values.targets[:, i] - current
    keys, _, current = compute_keys(
        model, tokenizer, spec, requests, layer, contexts, site=site, site_layer=hp.layers[-1], across_ranks=True
    )
    residual = (values.targets - current) / (len(hp.layers) - i)  # this layer's share of the missing residual
    if spec.post_mlp_norm is not None and hp.post_norm == "project":
        # W's output passes the norm N(m) = g ⊙ m / rms(m) before the residual: ask W for the change of m that
        # brings N(m) nearest to N(m) + residual (postnorm.py); the rest is left to later layers.
        m = mlp_outputs(model, tokenizer, spec, requests, layer, contexts)
        wanted = residual
        residual, reached = pre_norm_targets(m, wanted, post_norm_gain(model, spec, layer))
        residual = residual.float()
        layer_info["reached"] = float(((reached * wanted).sum(1) / wanted.pow(2).sum(1).clamp_min(1e-30)).mean())
        layer_info["residual_wanted_norm"] = float(wanted.norm(dim=1).mean())
    return keys, residual


def _spread(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    method: str,
    hp: EditHparams,
    covs: Mapping[int, EditCovariance],
    previous_keys: Mapping[int, torch.Tensor] | None,
    values: ValueResult | None,
) -> EditResult:
    t0 = time.perf_counter()
    if values is None:
        values = compute_targets(model, tokenizer, requests, method=method, hparams=hp)
    contexts = values.contexts or _contexts(model, tokenizer, hp)
    spec = arch_for(model)
    info = _base_info(method, hp, contexts, edit_site(spec, hp))
    info["requests"] = values.info
    info["seconds_values"] = time.perf_counter() - t0
    deltas, keys_out = {}, {}
    t1 = time.perf_counter()
    neighbours: dict[int, torch.Tensor] = {}
    if hp.template_neighbours > 0 and hp.template_neighbours_weight > 0:  # before any layer is edited, like C0
        neighbours = template_neighbour_keys(
            model, tokenizer, spec, requests, hp.layers, hp.template_neighbours, hp.template_neighbours_source
        )
    info["template_neighbours"] = len(next(iter(neighbours.values()))) if neighbours else 0
    for i, layer in enumerate(hp.layers):
        layer_info = info["layers"].setdefault(str(layer), {})
        keys, residual = _layer_residual(model, tokenizer, requests, hp, values, contexts, i, layer_info)
        prev = previous_keys.get(layer) if previous_keys else None
        problem = _problem(covs[layer], hp, residual, keys, previous_keys=prev, template_keys=neighbours.get(layer))
        try:
            update = solve_layer(method, problem)
        except EditFailedError as exc:
            raise EditFailedError(f"layer {layer}: {exc}") from None
        deltas[layer] = _apply(model, layer, update.a, update.b)
        keys_out[layer] = keys.detach()
        layer_info.update(update.info)
    info["seconds_solve"] = time.perf_counter() - t1
    info["seconds"] = time.perf_counter() - t0
    return EditResult(deltas=deltas, info=info, keys=keys_out)


def _rome(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hp: EditHparams,
    covs: Mapping[int, EditCovariance],
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
        residual = values.targets - current  # v* − W k at the bare prompt, (1, d_model)
        problem = _problem(covs[layer], hp, residual, key_star, bare_keys=key_bare)
        try:
            update = solve_layer("rome", problem)
        except EditFailedError as exc:
            raise EditFailedError(f"layer {layer}, case {req.case_id}: {exc}") from None
        a32, b32 = _apply(model, layer, update.a, update.b)
        factors_a.append(a32)
        factors_b.append(b32)
        keys_out.append(key_star.detach())
        info["requests"].extend(values.info)
    info["seconds"] = time.perf_counter() - t0
    deltas = {layer: (torch.cat(factors_a, dim=1), torch.cat(factors_b, dim=1))}
    return EditResult(deltas=deltas, info=info, keys={layer: torch.cat(keys_out)})
