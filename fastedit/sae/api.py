"""The SAE entry points the CLI calls: `train_sae` (capture -> cache -> train -> evaluate -> save) and `eval_sae`."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fastedit.atomic import check_writable, is_occupied
from fastedit.errors import FasteditError, OutputError
from fastedit.models import load_model, model_name, placement
from fastedit.sae.activations import (
    ShufflingBuffer,
    bos_id,
    cached_activations,
    check_sae_corpus,
    chunks_of,
    corpus_source,
    load_activations,
    read_corpus,
    stream_activations,
)
from fastedit.sae.io import SAEInfo, load_sae, save_sae
from fastedit.sae.metrics import ce_recovered, reconstruction_metrics
from fastedit.sae.model import ARCHS, SAE
from fastedit.sae.train import TrainConfig, steps_for, train_on_batches

log = logging.getLogger(__name__)


def model_and_tokenizer(model: Any, tokenizer: Any, placed: tuple[torch.device, torch.dtype]) -> tuple[Any, Any]:
    """(model, tokenizer): loaded on ``placed`` = (device, dtype) when ``model`` is a name (the SAE stays float32
    on the CPU; activations move between the two)."""
    if isinstance(model, str):
        return load_model(model, device=placed[0], dtype=placed[1])
    if tokenizer is None:
        raise FasteditError("pass a tokenizer with a loaded model")
    return model, tokenizer


def evaluate_sae(
    model: torch.nn.Module,
    tokenizer: Any,
    sae: SAE,
    info: SAEInfo,
    *,
    corpus: str | Path | None = None,
    tokens: int = 20_000,
    ce_windows: int = 8,
) -> dict[str, Any]:
    """Metrics on the held-out part of the corpus (the last 10%, never trained on)."""
    check_fits(model, sae, info)
    text = read_corpus(
        corpus, part="heldout", tokens=tokens + ce_windows * info.context_size, model=model, tokenizer=tokenizer
    )
    acts = torch.cat(list(stream_activations(model, tokenizer, text, info.layer, site=info.site, max_tokens=tokens)))
    metrics = reconstruction_metrics(sae, acts)
    if ce_windows:
        metrics.update(ce_recovered(model, tokenizer, sae, text, info.layer, site=info.site, n_windows=ce_windows))
    return metrics


def check_fits(model: torch.nn.Module, sae: SAE, info: SAEInfo) -> None:
    """The SAE's d_in must equal the hooked layer's width."""
    from fastedit.arch import arch_for

    d_model = arch_for(model).d_model(model.config)
    if sae.cfg.d_in != d_model:
        raise FasteditError(
            f"SAE d_in {sae.cfg.d_in} does not match {model_name(model)}'s layer {info.layer} width {d_model}: "
            "this SAE was trained on another model or hook"
        )


def train_sae(
    model: Any,
    layer: int,
    out: str | Path,
    *,
    tokenizer: Any = None,
    arch: str = "topk",
    width: int | None = None,
    tokens: int = 100_000,
    site: str = "resid_post",
    corpus: str | Path | None = None,
    context: int = 128,
    forget_texts: list[str] | None = None,
    forget_topic: str | None = None,
    counterfact: str | Path | None = None,
    eval_tokens: int = 20_000,
    ce_windows: int = 8,
    activation_cache: str | Path | None = None,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train one SAE at ``layer`` on ``tokens`` corpus activations (cached and reused) and save it to ``out``.

    ``width`` defaults to 8 × d_in. ``overrides`` set `TrainConfig` fields (k, l1, lr, epochs, ...).
    ``forget_topic`` (or explicit ``forget_texts``) feeds the variants' forget objectives with the CounterFact
    topic's statements (see `questions.py`). Returns the metrics recorded in cfg.json. An existing SAE folder
    at ``out`` is refused (before any work) unless ``overwrite``.
    """
    placed = placement(device, dtype)  # every check before the model loads, these first
    if arch not in ARCHS:
        raise FasteditError(f"unknown SAE arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if is_occupied(Path(out)) and not overwrite:
        raise OutputError(f"SAE folder {str(out)!r} already exists; choose another --out or pass --overwrite")
    check_writable(Path(out).parent, "the SAE folder")
    check_sae_corpus(corpus)
    model, tokenizer = model_and_tokenizer(model, tokenizer, placed)
    from fastedit.arch import arch_for

    d_in = arch_for(model).d_model(model.config)
    width = width or 8 * d_in
    fields = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise FasteditError(
            f"unknown SAE training option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}"
        )
    if arch == "factor" and width % overrides.get("n_clusters", 32):
        raise FasteditError(f"--width {width} must be a multiple of the factor SAE's 32 clusters")
    cfg = TrainConfig(arch=arch, width=width, **overrides)
    if forget_topic and not forget_texts:
        from fastedit.sae.questions import read_counterfact, topic_texts

        cases = [q for q in read_counterfact(counterfact) if q.topic == forget_topic]
        if not cases:
            raise FasteditError(f"no CounterFact case has topic {forget_topic!r}")
        forget_texts = topic_texts(cases[:400])
    text = read_corpus(corpus, part="train", tokens=tokens, model=model, tokenizer=tokenizer)
    path = cached_activations(
        model, tokenizer, text, layer, site=site, context=context, tokens=tokens, folder=activation_cache
    )
    acts = load_activations(path)
    forget = None
    if forget_texts:
        forget = torch.cat(list(stream_activations(model, tokenizer, forget_texts, layer, site=site, progress=False)))
    buffer = ShufflingBuffer(
        lambda: chunks_of(acts), size=min(cfg.buffer_size, len(acts)), batch_size=cfg.batch_size, seed=cfg.seed
    )
    total = steps_for(len(acts), cfg)
    result = train_on_batches(cfg, lambda: buffer.batches(epochs=cfg.epochs), acts[:8192].float(), total, forget=forget)
    info = SAEInfo(
        model_name=model_name(model),
        layer=layer,
        site=site,
        context_size=context,
        prepend_bos=bos_id(tokenizer) is not None,
        dataset_path=corpus_source(corpus, model, tokenizer).describe,
        train={**asdict(cfg), "tokens": len(acts), "forget_texts": len(forget_texts or []), **result.log},
    )
    info.metrics = evaluate_sae(
        model, tokenizer, result.sae, info, corpus=corpus, tokens=eval_tokens, ce_windows=ce_windows
    )
    extra = {k: v for k, v in result.stats.items() if k != "sparsity"}
    save_sae(result.sae, info, out, result.stats["sparsity"], extra, overwrite=overwrite)
    log.info("saved %s SAE to %s: %s", arch, out, info.metrics)
    return {"out": str(out), "arch": arch, "width": width, "layer": layer, **info.metrics, **{"train": result.log}}


def eval_sae(
    folder: str | Path,
    *,
    model: Any = None,
    tokenizer: Any = None,
    corpus: str | Path | None = None,
    tokens: int = 20_000,
    ce_windows: int = 8,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """Load an SAE folder (fastedit or SAELens layout) and measure it on held-out text of its model."""
    placed = placement(device, dtype)
    sae, info = load_sae(folder)
    check_sae_corpus(corpus)
    if model is None:
        if not info.model_name:
            raise FasteditError(f"{folder}/cfg.json names no model_name; pass --model")
        model = info.model_name
    model, tokenizer = model_and_tokenizer(model, tokenizer, placed)
    metrics = evaluate_sae(model, tokenizer, sae, info, corpus=corpus, tokens=tokens, ce_windows=ce_windows)
    return {
        "folder": str(folder),
        "arch": sae.cfg.arch,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "hook": info.hook_name,
        **metrics,
    }
