"""The library pipeline: ``edit`` (covariance → pre metrics → edit in batches → patch → post metrics) and
``evaluate``. Eval scripts call these; the ``fastedit edit`` command wraps them with file I/O (`run.py`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastedit.config import config_to_dict
from fastedit.editing.patch import Patch, apply_factors, make_patch, restore_weights, snapshot_weights
from fastedit.editing.requests import EditRequest, as_requests, check_request_lengths
from fastedit.errors import ConfigError
from fastedit.evaluation.metrics import Metrics, evaluate_requests

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


def edit(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Any,
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
) -> EditOutcome:
    """Edit ``model`` in place for ``requests`` and return the patch and the metrics before and after.

    requests: a file path, `EditRequest`s or raw records. hparams: None (the model's default file), a path, or
    loaded hparams. stats: None (cached or computed with ``dm``/``corpus`` via `fastedit.stats.ensure_stats`),
    or layer -> C0 tensor / `KeyStats`. batch_size: requests per closed-form solve (None: all at once); later
    batches see the model edited by earlier ones, and AlphaEdit projects each batch away from earlier keys.
    The model ends in exactly the state `apply_patch(original model, outcome.patch)` gives; if anything fails,
    every weight is restored bit-exactly before the error propagates.
    """
    from fastedit.arch import arch_for
    from fastedit.editing.engine import apply_edit
    from fastedit.editing.hparams import EditHparams, check_layers, load_hparams
    from fastedit.models import model_name as loaded_name

    reqs = as_requests(requests)
    check_request_lengths(reqs, tokenizer, arch_for(model).max_positions(model.config))  # before any v* work
    name = model_name or loaded_name(model)
    hp = hparams if isinstance(hparams, EditHparams) else load_hparams(method, model, hparams)
    if hp.method != method:
        raise ConfigError(f"hparams are for method {hp.method!r}, not {method!r}")
    check_layers(hp, arch_for(model).n_layers(model.config))
    layers = list(hp.layers)
    torch.manual_seed(seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    covs, stats_record = _covariances(
        model, tokenizer, layers, stats, dm=dm, corpus=corpus, stats_dir=stats_dir, model_name=name, seed=seed
    )
    timings["stats"] = time.perf_counter() - t

    pre = None
    if evaluate:
        t = time.perf_counter()
        pre = evaluate_requests(model, tokenizer, reqs, batch_size=eval_batch_size, fluency=fluency, seed=seed)
        timings["eval_pre"] = time.perf_counter() - t

    originals = snapshot_weights(model, layers)
    batches = _batches(reqs, batch_size)
    factors: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    previous: dict[int, torch.Tensor] = {}
    batch_info: list[dict[str, Any]] = []
    t = time.perf_counter()
    try:
        for i, batch in enumerate(batches):
            log.info("editing batch %d/%d (%d requests, %s)", i + 1, len(batches), len(batch), method)
            result = apply_edit(
                model,
                tokenizer,
                batch,
                method=method,
                hparams=hp,
                stats=covs,
                previous_keys=previous if method == "alphaedit" and previous else None,
            )
            for layer, ab in result.deltas.items():
                factors.setdefault(layer, []).append(ab)
            if method == "alphaedit":  # K_p: every earlier batch's keys, so later updates leave them alone
                for layer, keys in result.keys.items():
                    previous[layer] = keys if layer not in previous else torch.cat([previous[layer], keys])
            batch_info.append(result.info)
        # Put the model in the patch's exact form: originals + round(A Bᵀ) per layer (see patch.py).
        combined = {
            l: (torch.cat([a for a, _ in fs], 1), torch.cat([b for _, b in fs], 1)) for l, fs in factors.items()
        }
        restore_weights(model, originals)
        apply_factors(model, combined)
    except BaseException:
        restore_weights(model, originals)
        raise
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
        post = evaluate_requests(model, tokenizer, reqs, batch_size=eval_batch_size, fluency=fluency, seed=seed)
        timings["eval_post"] = time.perf_counter() - t
    return EditOutcome(
        patch, pre, post, hp, {"batches": batch_info, "stats": stats_record, "timings": timings, "n": len(reqs)}
    )
