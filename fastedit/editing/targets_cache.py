"""A disk cache of v* targets, so a second editor (or a λ sweep, or a rerun) on the same model and requests
skips the optimisation, which is nearly the whole cost of an edit.

The key hashes everything the targets depend on: the v* settings and edit site (`values_key`), the requests,
the model's config and a fingerprint of its weights (every parameter sampled on a fixed stride, plus the edited
layers' ``mlp_out`` weights in full, so a model edited by an earlier batch gets new targets). A file holds the
init/targets/δ tensors and the per-request info; it is written atomically and checked on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fastedit.arch import arch_for, mlp_out_param, model_device
from fastedit.atomic import save_safetensors, write_text
from fastedit.editing.hparams import EditHparams
from fastedit.editing.patch import tensor_sha256
from fastedit.editing.values import ValueResult, values_key
from fastedit.requests import EditRequest
from fastedit.stats.distributed import all_ranks_agree, rank_and_world

log = logging.getLogger(__name__)

SAMPLED_ELEMENTS = 4096  # per parameter: enough to tell checkpoints apart, cheap for a 7B model
FORMAT = "fastedit-targets/2"


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module, layers: Sequence[int]) -> str:
    """sha256 over the config, every parameter sampled on a stride, and the edited layers' mlp_out in full."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        flat = param.reshape(-1)
        step = max(1, flat.numel() // SAMPLED_ELEMENTS)
        digest.update(f"{name}:{tensor_sha256(flat[::step])}".encode())
    spec = arch_for(model)
    for layer in layers:
        digest.update(tensor_sha256(mlp_out_param(model, spec, layer)).encode())
    return digest.hexdigest()


def targets_key(model: torch.nn.Module, requests: Sequence[EditRequest], hp: EditHparams) -> str:
    """What the v* targets of ``requests`` under ``hp`` depend on, hashed."""
    record = {
        "format": FORMAT,
        "values": values_key(arch_for(model), hp),
        "requests": [[r.case_id, r.prompt, r.subject, r.target_new] for r in requests],
        "weights": weights_fingerprint(model, hp.layers),
        "dtype": str(next(model.parameters()).dtype),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def load_targets(folder: str | Path, key: str, n_requests: int) -> ValueResult | None:
    """The cached targets for ``key``, or None (missing, or unreadable: then it is recomputed and replaced)."""
    path = Path(folder) / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(path)
        with open(path.with_suffix(".json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        result = ValueResult(
            init=tensors["init"], targets=tensors["targets"], info=meta["info"], contexts=meta["contexts"],
            key=meta["values_key"], delta=tensors["delta"],
        )  # fmt: skip
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        log.warning("v* cache %s is unreadable (%s); recomputing", path, exc)
        return None
    if len(result.info) != n_requests or not torch.isfinite(result.targets).all():
        log.warning("v* cache %s does not match the requests; recomputing", path)
        return None
    return result


def save_targets(folder: str | Path, key: str, values: ValueResult) -> Path:
    """Write the targets (tensors, then the JSON that makes them loadable), each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    tensors = {"init": values.init, "targets": values.targets}
    tensors["delta"] = values.delta if values.delta is not None else values.targets - values.init
    meta = {"info": values.info, "contexts": values.contexts, "values_key": values.key}
    save_safetensors(path, {k: v.detach().float() for k, v in tensors.items()})
    write_text(path.with_suffix(".json"), json.dumps(meta))
    return path


def cached_targets(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    hp: EditHparams,
    folder: str | Path,
) -> tuple[ValueResult, bool]:
    """(targets, hit): from ``folder`` when this exact computation was cached, else computed and cached.

    Across ranks (torchrun, ``--workers``) the cache is used only when every rank found it, since computing
    the targets is collective; rank 0 alone writes."""
    from fastedit.editing.engine import compute_targets

    key = targets_key(model, requests, hp)
    hit = load_targets(folder, key, len(requests))
    if not all_ranks_agree(hit is not None):
        hit = None
    if hit is not None:
        log.info("v* targets of %d requests from the cache (%s)", len(requests), key)
        device = model_device(model)
        hit.init, hit.targets = hit.init.to(device), hit.targets.to(device)
        hit.delta = hit.delta.to(device) if hit.delta is not None else None
        return hit, True
    values = compute_targets(model, tokenizer, requests, method=hp.method, hparams=hp)
    if rank_and_world()[0] == 0:
        save_targets(folder, key, values)
    return values, False
