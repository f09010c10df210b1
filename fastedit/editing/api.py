"""The library pipeline: ``edit`` (covariance → pre metrics → edit in batches → patch → post metrics) and
``evaluate``. Eval scripts call these; the ``fastedit edit`` command wraps them with file I/O (`run.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastedit.arch import mlp_out_param, restore_mlp_out, snapshot_mlp_out
from fastedit.config import config_to_dict
from fastedit.editing.easyedit import requests_from_keywords
from fastedit.editing.patch import Patch, apply_factors, make_patch
from fastedit.errors import ConfigError
from fastedit.evaluation.metrics import Metrics, evaluate_requests, summarize
from fastedit.requests import EditRequest, as_requests, check_request_lengths
from fastedit.stats.distributed import all_gather_objects, broadcast_, is_distributed, rank_and_world, shard_bounds

log = logging.getLogger(__name__)


@dataclass
class EditOutcome:
    """What `edit` returns: the patch (already applied to the model), metrics before/after, and run info."""

    patch: Patch
    pre: Metrics | None
    post: Metrics | None
    hparams: Any
    info: dict[str, Any] = field(default_factory=dict)  # per-batch engine info, stats metadata, timings

    def save_patch(self, path: str | Path) -> Path:
        return self.patch.save(path)


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Any,
    *,
    batch_size: int = 16,
    fluency: bool = False,
    seed: int = 0,
) -> Metrics:
    """CounterFact ES/PS/NS/Score (+ magnitudes) and zsRE token accuracies of ``model`` on ``requests``.

    ``requests``: a request file path, `EditRequest`s, or raw records of any supported layout.
    """
    return evaluate_requests(model, tokenizer, requests, batch_size=batch_size, fluency=fluency, seed=seed)


def _covariances(
    model: torch.nn.Module,
    tokenizer: Any,
    layers: list[int],
    stats: Mapping[int, Any] | None,
    *,
    dm: float | str,
    corpus: str | None,
    stats_dir: str | Path | None,
    model_name: str | None,
    seed: int,
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """C0 per edited layer (float64, (d_k, d_k)) and a JSON record of where it came from."""
    if stats is None:
        from fastedit.stats import ensure_stats

        computed = ensure_stats(
            model, tokenizer, layers, dm=dm, corpus=corpus, out=stats_dir, model_name=model_name, seed=seed
        )
        return {l: computed[l].mean for l in layers}, {str(l): dict(computed[l].metadata) for l in layers}
    missing = [l for l in layers if l not in stats]
    if missing:
        raise ConfigError(f"stats given for layers {sorted(stats)}, but the edit needs layers {missing} too")
    covs: dict[int, torch.Tensor] = {}
    record: dict[str, Any] = {}
    for l in layers:
        value = stats[l]
        if isinstance(value, torch.Tensor):
            covs[l], record[str(l)] = value, {"source": "tensor passed to fastedit.edit"}
        else:  # KeyStats
            covs[l], record[str(l)] = value.mean, dict(getattr(value, "metadata", {}))
    return covs, record


def _batches(requests: list[EditRequest], size: int | None) -> list[list[EditRequest]]:
    if size is None or size >= len(requests):
        return [requests]
    if size < 1:
        raise ConfigError(f"batch size must be at least 1, got {size}")
    return [requests[i : i + size] for i in range(0, len(requests), size)]


def _edit_in_batches(
    model: torch.nn.Module,
    tokenizer: Any,
    batches: list[list[EditRequest]],
    method: str,
    hp: Any,
    covs: Mapping[int, Any],
    targets_cache: str | Path | None,
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[int, torch.Tensor], list[dict[str, Any]]]:
    """Edit batch after batch (each sees the earlier ones' edits); returns the combined factors per layer, the
    original weights, and each batch's engine info. The model ends in the patch's exact form: originals +
    round(A Bᵀ) per layer (see patch.py); on any error it is restored."""
    from fastedit.arch import arch_for
    from fastedit.editing.engine import apply_edit
    from fastedit.editing.targets_cache import cached_targets

    spec = arch_for(model)
    originals = snapshot_mlp_out(model, spec, hp.layers)
    factors: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    previous: dict[int, torch.Tensor] = {}  # AlphaEdit's K_p: every earlier batch's keys
    batch_info: list[dict[str, Any]] = []
    try:
        for i, batch in enumerate(batches):
            log.info("editing batch %d/%d (%d requests, %s)", i + 1, len(batches), len(batch), method)
            values, targets_hit = None, None
            if targets_cache is not None and method != "rome":
                values, targets_hit = cached_targets(model, tokenizer, batch, hp, targets_cache)
            result = apply_edit(
                model, tokenizer, batch, method=method, hparams=hp, stats=covs,
                previous_keys=previous if method == "alphaedit" and previous else None, values=values,
            )  # fmt: skip
            result.info["targets_from_cache"] = targets_hit
            _same_on_every_rank(model, spec, hp.layers, result)
            for layer, ab in result.deltas.items():
                factors.setdefault(layer, []).append(ab)
            if method == "alphaedit":
                for layer, keys in result.keys.items():
                    previous[layer] = keys if layer not in previous else torch.cat([previous[layer], keys])
            batch_info.append(result.info)
        combined = {
            l: (torch.cat([a for a, _ in fs], 1), torch.cat([b for _, b in fs], 1)) for l, fs in factors.items()
        }
        restore_mlp_out(model, spec, originals)
        apply_factors(model, combined)
    except BaseException:
        restore_mlp_out(model, spec, originals)
        raise
    return combined, originals, batch_info


def _same_on_every_rank(model: torch.nn.Module, spec: Any, layers: Sequence[int], result: Any) -> None:
    """Rank 0's edited weights, factors and keys on every rank of a process group. The ranks solved the same
    problem from the same gathered targets, so they differ by float noise at most; this makes them agree bit for
    bit, so later batches (and the patch every rank builds) are identical."""
    if not is_distributed():
        return
    for layer in layers:
        broadcast_(mlp_out_param(model, spec, layer).data)
    for a, b in result.deltas.values():
        broadcast_(a)
        broadcast_(b)
    for keys in result.keys.values():
        broadcast_(keys)


def _evaluate(
    model: torch.nn.Module, tokenizer: Any, reqs: list[EditRequest], *, batch_size: int, fluency: bool, seed: int
) -> Metrics:
    """`evaluate_requests`; across ranks each scores its contiguous share of the cases and every rank receives
    all of them in order. With ``fluency`` every rank evaluates everything: the samples come from one seeded
    stream over all cases, which a split would change."""
    rank, world = rank_and_world()
    if world == 1 or fluency:
        return evaluate_requests(model, tokenizer, reqs, batch_size=batch_size, fluency=fluency, seed=seed)
    lo, hi = shard_bounds(len(reqs), rank, world)
    part = evaluate_requests(model, tokenizer, reqs[lo:hi], batch_size=batch_size, seed=seed).cases if hi > lo else []
    cases = [case for share in all_gather_objects(part) for case in share]
    return Metrics(summarize(cases), cases)


def edit(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Any = None,
    method: str = "memit",
    hparams: Any = None,
    stats: Mapping[int, Any] | None = None,
    *,
    dm: float | str = 10,
    corpus: str | None = None,
    stats_dir: str | Path | None = None,
    batch_size: int | None = None,
    evaluate: bool = True,
    eval_batch_size: int = 16,
    fluency: bool = False,
    seed: int = 0,
    model_name: str | None = None,
    targets_cache: str | Path | None = None,
    **easyedit: Any,
) -> EditOutcome:
    """Edit ``model`` in place for ``requests`` and return the patch and the metrics before and after.

    requests: a file path, `EditRequest`s or raw records. hparams: None (the model's default file), a path, or
    loaded hparams. stats: None (cached or computed with ``dm``/``corpus`` via `fastedit.stats.ensure_stats`),
    or layer -> C0 tensor / `KeyStats`. batch_size: requests per closed-form solve (None: all at once); later
    batches see the model edited by earlier ones, and AlphaEdit projects each batch away from earlier keys.
    targets_cache: a folder where the v* targets of each batch are kept and looked up
    (`fastedit.editing.targets_cache`), so another method or λ on the same model and requests skips the
    optimisation. EasyEdit users: ``prompts=, target_new=, subject=, ground_truth=, rephrase_prompts=,
    locality_inputs=`` may replace ``requests``, and hparams may be an EasyEdit YAML file (see `easyedit.py`).
    The model ends in exactly the state `apply_patch(original model, outcome.patch)` gives; if
    anything fails, every weight is restored bit-exactly before the error propagates.
    """
    from fastedit.arch import arch_for
    from fastedit.editing.engine import prepare_covariances, resolve_hparams
    from fastedit.editing.hparams import check_layers
    from fastedit.models import model_name as loaded_name

    reqs = as_requests(requests_from_keywords(requests, easyedit))
    check_request_lengths(reqs, tokenizer, arch_for(model).max_positions(model.config))  # before any v* work
    name = model_name or loaded_name(model)
    hp = resolve_hparams(model, method, hparams)
    check_layers(hp, arch_for(model).n_layers(model.config))
    torch.manual_seed(seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    raw, stats_record = _covariances(
        model, tokenizer, list(hp.layers), stats, dm=dm, corpus=corpus, stats_dir=stats_dir, model_name=name,
        seed=seed,
    )  # fmt: skip
    covs = prepare_covariances(model, raw, hp)  # on the weights' devices once; AlphaEdit's projector kept
    timings["stats"] = time.perf_counter() - t

    pre = None
    if evaluate:
        t = time.perf_counter()
        pre = _evaluate(model, tokenizer, reqs, batch_size=eval_batch_size, fluency=fluency, seed=seed)
        timings["eval_pre"] = time.perf_counter() - t

    t = time.perf_counter()
    combined, originals, batch_info = _edit_in_batches(
        model, tokenizer, _batches(reqs, batch_size), method, hp, covs, targets_cache
    )
    timings["edit"] = time.perf_counter() - t

    patch = make_patch(
        model,
        combined,
        {l: originals[l] for l in combined},
        method=method,
        model=name,
        hparams=config_to_dict(hp),
        case_ids=[r.case_id for r in reqs],
        batch_size=batch_size,
        stats=stats_record,
        seed=seed,
    )
    post = None
    if evaluate:
        t = time.perf_counter()
        post = _evaluate(model, tokenizer, reqs, batch_size=eval_batch_size, fluency=fluency, seed=seed)
        timings["eval_post"] = time.perf_counter() - t
    return EditOutcome(
        patch, pre, post, hp, {"batches": batch_info, "stats": stats_record, "timings": timings, "n": len(reqs)}
    )
