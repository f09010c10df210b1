"""Unlearning by SAE feature clamping (SAEBench protocol) versus closed-form edits, scored on the same questions.

Protocol (SAEBench, after Farrell et al. 2024), per SAE:
 1. firing frequency f_i of each feature on the forget corpus and on a retain corpus (generic text);
 2. for retain threshold t ∈ {0.001, 0.01}: drop features with retain frequency ≥ t; take the top n ∈ {10, 20}
    of the rest by forget frequency;
 3. at inference, wherever a chosen feature is active (z_i > 0) set it to −c and add back the SAE error, i.e.
        x' = x + Σ_{i chosen, z_i>0} (−c_i − z_i) d_i        (d_i: raw-space decoder row, (d_in,))
    which equals decode(z') + (x − decode(z)). Applied through the registry hook of the SAE's layer.
    Grids for c: ``absolute``: c_i = m, m ∈ {25, 50, 100, 200} (SAEBench's values, in activation units);
    ``norm-scaled``: c_i = s·median‖x‖ / ‖d_i‖, s ∈ {0.25, 0.5, 1, 2}: the clamp moves the residual by s times
    the layer's median residual norm (SAEBench's values were absolute sizes for Gemma-2-2B's residual).
 4. keep configurations whose retain accuracy is ≥ 99% of the original (each grid is scored weakest clamp first;
    by default, once one fails the gate the stronger clamps of the same features are recorded as skipped, not
    scored: ``skip_stronger_after_fail``, a time saving SAEBench does not make); the score of the SAE is
    1 − (lowest forget accuracy among kept configurations); 0.0 when only the unclamped model passes.
Accuracy = share of the (known) questions whose true answer still beats the counterfactual (`questions.py`).
Editing rows: MEMIT and EMMET rewrite every forget fact to its CounterFact ``target_new``; the same retain gate
and score apply. Weights are restored after each edit.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastedit.arch import arch_for, edit_output, mlp_out_param
from fastedit.config import config_to_dict
from fastedit.data import resolve_data
from fastedit.errors import FasteditError
from fastedit.models import load_model, model_name
from fastedit.sae.activations import hook_path, read_corpus, stream_activations
from fastedit.sae.api import check_fits
from fastedit.sae.io import SAEInfo, file_mode, load_sae
from fastedit.sae.model import SAE
from fastedit.sae.questions import (
    Question,
    QuestionSets,
    accuracy_flags,
    build_question_sets,
    default_counterfact,
)

log = logging.getLogger(__name__)


@dataclass
class UnlearnConfig:
    """The protocol's grid and the question-set sizes (recorded in unlearning.json)."""

    forget_topic: str = "languages"
    retain_thresholds: list[float] = field(default_factory=lambda: [0.001, 0.01])
    n_features: list[int] = field(default_factory=lambda: [10, 20])
    multipliers: list[float] = field(default_factory=lambda: [25.0, 50.0, 100.0, 200.0])
    norm_scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    retain_gate: float = 0.99
    # Clamps of one feature set are scored weakest first; once one fails the retain gate, the stronger ones of the
    # same grid are recorded as skipped instead of scored (they move the residual further; False scores them all).
    skip_stronger_after_fail: bool = True
    retain_corpus_tokens: int = 20_000
    candidates_per_topic: int = 80
    max_forget: int = 40
    retain_per_topic: int = 10
    min_forget: int = 20
    editors: list[str] = field(default_factory=lambda: ["memit", "emmet"])
    editor_hparams: dict[str, str] = field(default_factory=dict)  # method -> hparams file (default: the model's)
    counterfact: str = ""
    corpus: str = ""


@torch.no_grad()
def firing_frequency(sae: SAE, acts: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """(d_sae,) share of the activation rows (n, d_in) on which each feature fires (z > 0)."""
    fired = torch.zeros(sae.cfg.d_sae)
    for i in range(0, len(acts), batch):
        fired += (sae.encode(acts[i : i + batch].float()) > 0).float().sum(0)
    return fired / max(len(acts), 1)


@dataclass
class _LayerActs:
    """Forget-corpus and retain-corpus activations at one hook, captured once and shared by every SAE there."""

    forget: torch.Tensor
    retain: torch.Tensor
    median_norm: float


def _layer_acts(
    model: torch.nn.Module, tokenizer: Any, info: SAEInfo, forget_texts: Sequence[str], retain_text: str, tokens: int
) -> _LayerActs:
    def grab(texts: str | Sequence[str], n: int) -> torch.Tensor:
        chunks = stream_activations(model, tokenizer, texts, info.layer, site=info.site, max_tokens=n, progress=False)
        return torch.cat([c.half() if c.abs().max() < 60_000 else c for c in chunks])

    forget, retain = grab(list(forget_texts), 50_000), grab(retain_text, tokens)
    return _LayerActs(forget, retain, float(retain.float().norm(dim=1).median()))


@dataclass
class _Mask:
    """Positions the clamp may touch in the current forward (real, non-BOS tokens); set by the scorer."""

    value: torch.Tensor | None = None

    def set(self, mask: torch.Tensor) -> None:
        self.value = mask


@contextlib.contextmanager
def clamp_features(
    model: torch.nn.Module, sae: SAE, info: SAEInfo, features: torch.Tensor, values: torch.Tensor, mask: _Mask
) -> Iterator[None]:
    """Set ``features`` (n,) to −``values`` (n,) wherever they are active, keeping the SAE error (see module doc)."""
    dec = sae.decoder()[features] * sae.scale  # (n, d_in) raw-space decoder rows

    def fn(h: torch.Tensor) -> torch.Tensor:
        z = sae.encode(h.float())[..., features]  # (b, s, n)
        active = z > 0
        if mask.value is not None and mask.value.shape == active.shape[:2]:
            active &= mask.value[..., None]
        delta = torch.where(active, -values - z, torch.zeros_like(z))
        return h + (delta @ dec).to(h.dtype)

    with edit_output(model, hook_path(model, info.layer, info.site), fn):
        yield


def _acc(flags: torch.Tensor) -> float:
    return float(flags.float().mean()) if len(flags) else float("nan")


@dataclass
class Scorer:
    """Forget/retain accuracy of the model as it is (hooks active), on fixed question sets."""

    model: torch.nn.Module
    tokenizer: Any
    sets: QuestionSets
    mask: _Mask = field(default_factory=_Mask)

    def retain(self) -> float:
        return _acc(accuracy_flags(self.model, self.tokenizer, self.sets.retain, set_mask=self.mask.set)[0])

    def forget(self) -> float:
        return _acc(accuracy_flags(self.model, self.tokenizer, self.sets.forget, set_mask=self.mask.set)[0])


def sae_row(
    scorer: Scorer,
    name: str,
    folder: str | Path,
    cfg: UnlearnConfig,
    retain_text: str,
    base: dict[str, float],
    cache: dict[tuple[int, str], _LayerActs] | None = None,
) -> dict[str, Any]:
    """Run the clamp grid of one SAE; returns its table row (best kept config) and the whole grid."""
    t0 = time.perf_counter()
    model, tok = scorer.model, scorer.tokenizer
    sae, info = load_sae(folder)
    check_fits(model, sae, info)
    cache = {} if cache is None else cache
    key = (info.layer, info.site)
    if key not in cache:
        cache[key] = _layer_acts(model, tok, info, scorer.sets.forget_corpus, retain_text, cfg.retain_corpus_tokens)
    acts = cache[key]
    f_forget, f_retain, med = firing_frequency(sae, acts.forget), firing_frequency(sae, acts.retain), acts.median_norm
    norms = sae.decoder_norms()
    grid, seen = [], {}
    for t, n in itertools.product(cfg.retain_thresholds, cfg.n_features):
        allowed = torch.where(f_retain < t, f_forget, torch.full_like(f_forget, -1.0))
        top = allowed.topk(min(n, int((allowed > 0).sum()))).indices
        if len(top) == 0:
            grid.append({"retain_threshold": t, "n": n, "note": "no feature fires on forget text below threshold"})
            continue
        scales = [("absolute", m, torch.full((len(top),), float(m))) for m in sorted(cfg.multipliers)]
        scales += [("norm-scaled", s, s * med / norms[top]) for s in sorted(cfg.norm_scales)]
        failed: set[str] = set()  # grids whose weaker clamp already failed the retain gate
        for grid_name, m, values in scales:
            key = (tuple(sorted(top.tolist())), grid_name, m)
            entry = {"retain_threshold": t, "n": n, "grid": grid_name, "multiplier": m, "features": top.tolist()}
            if key in seen:
                grid.append({**entry, **seen[key], "duplicate": True})
                continue
            if cfg.skip_stronger_after_fail and grid_name in failed:
                grid.append({**entry, "kept": False, "skipped": "a weaker clamp of these features failed the gate"})
                continue
            with clamp_features(model, sae, info, top, values, scorer.mask):
                retain = scorer.retain()
                # The forget set is only scored where the retain gate passes (the others cannot be kept).
                forget = scorer.forget() if retain >= cfg.retain_gate * base["retain"] else None
            seen[key] = {"retain_acc": retain, "forget_acc": forget, "kept": forget is not None}
            if forget is None:
                failed.add(grid_name)
            grid.append({**entry, **seen[key]})
            log.info("%s %s", name, grid[-1] | {"features": len(top)})
    kept = [g for g in grid if g.get("kept")]
    best = min(kept, key=lambda g: (g["forget_acc"], -g["retain_acc"])) if kept else None
    row: dict[str, Any] = {
        "method": name,
        "kind": "sae",
        "sae": str(folder),
        "arch": sae.cfg.arch,
        "layer": info.layer,
        "median_residual_norm": med,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if best is None:
        row.update(
            forget_acc=base["forget"],
            retain_acc=base["retain"],
            score=0.0,
            note=f"no clamp configuration kept retain accuracy ≥ {cfg.retain_gate:.0%} of the original",
        )
    else:
        row.update(
            forget_acc=best["forget_acc"],
            retain_acc=best["retain_acc"],
            score=max(0.0, 1.0 - best["forget_acc"]),
            config={k: best[k] for k in ("retain_threshold", "n", "grid", "multiplier")},
            note=f"best kept configuration uses the {best['grid']} grid",
        )
    return {"row": row, "grid": grid}


@contextlib.contextmanager
def _restored_weights(model: torch.nn.Module) -> Iterator[None]:
    """Snapshot every layer's editable matrix and put it back afterwards (editors change them in place)."""
    spec = arch_for(model)
    params = [mlp_out_param(model, spec, i) for i in range(spec.n_layers(model.config))]
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


def edit_row(
    scorer: Scorer,
    method: str,
    base: dict[str, float],
    cfg: UnlearnConfig,
    values_cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rewrite every forget fact to its counterfactual with ``method`` (MEMIT/EMMET), score, restore.

    ``values_cache`` (values key -> v* targets) lets MEMIT and EMMET share one v* optimisation when their
    hparams ask for the same targets (it is the slow part); a row that reused targets says so.
    """
    row: dict[str, Any] = {"method": method, "kind": "edit"}
    t0 = time.perf_counter()
    try:
        from fastedit.editing.context import context_templates
        from fastedit.editing.engine import apply_edit
        from fastedit.editing.hparams import hparams_path, load_hparams
        from fastedit.editing.requests import EditRequest
        from fastedit.editing.values import compute_values, edit_site, site_start_layer, values_key
        from fastedit.stats import ensure_stats
    except ImportError as exc:
        log.warning("%s row: editors missing (%s)", method, exc)
        return {**row, "forget_acc": None, "retain_acc": None, "score": None, "note": "not available: editors missing"}
    model, tok = scorer.model, scorer.tokenizer
    spec = arch_for(model)
    requests = [_request(q, EditRequest) for q in scorer.sets.forget]
    values_cache = {} if values_cache is None else values_cache
    try:
        hp_file = cfg.editor_hparams.get(method) or hparams_path(method, model)
        hp = load_hparams(method, model, hp_file)
        # C0 from the retain corpus when one is named, else the default corpus (wikitext-2 data set or model text)
        computed = ensure_stats(model, tok, list(hp.layers), dm=10, corpus=cfg.corpus or None)
        stats = {layer: ks.mean for layer, ks in computed.items()}  # C0 per edited layer
        key = values_key(spec, hp)
        shared = key in values_cache
        if not shared:
            contexts = context_templates(
                model, tok, seeds=hp.context_seeds, length=hp.context_length, seed=hp.context_seed
            )
            values_cache[key] = compute_values(
                model,
                tok,
                spec,
                requests,
                site=edit_site(spec, hp),
                layer=site_start_layer(spec, hp),
                contexts=contexts,
                hp=hp,
            )
        with _restored_weights(model):
            apply_edit(model, tok, requests, method=method, hparams=hp, stats=stats, values=values_cache[key])
            retain, forget = scorer.retain(), scorer.forget()
    except Exception as exc:  # an editor failure must not sink the other rows
        log.exception("%s edit failed", method)
        return {**row, "forget_acc": None, "retain_acc": None, "score": None, "note": f"failed: {exc}"}
    passed = retain >= cfg.retain_gate * base["retain"]
    note = "retain gate passed" if passed else f"retain gate failed (raw score {1 - forget:.3f}); scored 0.0"
    return {
        **row,
        "forget_acc": forget,
        "retain_acc": retain,
        "score": max(0.0, 1.0 - forget) if passed else 0.0,
        "seconds": round(time.perf_counter() - t0, 1),
        "hparams": str(hp_file),
        "note": note + ("; v* targets shared with an earlier row" if shared else ""),
    }


def _request(q: Question, cls: Any) -> Any:
    return cls(
        case_id=q.case_id,
        prompt=q.prompt.replace(q.subject, "{}", 1),
        subject=q.subject,
        target_new=q.new,
        target_true=q.true,
        paraphrases=(q.rephrase,) if q.rephrase else (),
    )


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [
        "| method | forget acc | retain acc | unlearning score | wall time (s) | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {f(r.get('forget_acc'))} | {f(r.get('retain_acc'))} | {f(r.get('score'))} | "
            f"{f(r.get('seconds'))} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def plot_rows(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    x = torch.arange(len(rows)).tolist()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    for off, key, label in (
        (-0.27, "forget_acc", "forget acc"),
        (0, "retain_acc", "retain acc"),
        (0.27, "score", "score"),
    ):
        ax.bar([i + off for i in x], [r.get(key) or 0.0 for r in rows], width=0.27, label=label)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(0, 1.05)
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


def run_unlearning(
    model: Any,
    saes: Sequence[str | Path],
    out: str | Path,
    *,
    tokenizer: Any = None,
    config: UnlearnConfig | None = None,
) -> dict[str, Any]:
    """The comparison: every SAE's clamp grid, then MEMIT and EMMET, on one forget/retain question split.

    Writes ``unlearning.json`` (config, topic split, rows, full grids), ``table.md`` and ``unlearning.png`` into
    ``out``; returns the JSON content.
    """
    cfg = config or UnlearnConfig()
    # the question file and the retain corpus (files or data-set names) must exist before the model loads
    questions = resolve_data(cfg.counterfact) if cfg.counterfact else default_counterfact()
    if not questions.is_file():
        raise FasteditError(f"--counterfact {cfg.counterfact!r} is neither a file nor a data set; pass a flat "
                            "CounterFact file or `fastedit data add counterfact FILE`")  # fmt: skip
    retain_text = read_corpus(cfg.corpus or None, part="train")
    if isinstance(model, str):
        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise FasteditError("pass a tokenizer with a loaded model")
    out = Path(out)
    saes_loaded = [(Path(s), *load_sae(s)) for s in saes]  # fail early on a bad folder, before any long work
    for _, sae, info in saes_loaded:
        check_fits(model, sae, info)
    t0 = time.perf_counter()
    sets = build_question_sets(
        model,
        tokenizer,
        cfg.forget_topic,
        counterfact=cfg.counterfact or None,
        candidates_per_topic=cfg.candidates_per_topic,
        max_forget=cfg.max_forget,
        retain_per_topic=cfg.retain_per_topic,
        min_forget=cfg.min_forget,
    )
    scorer = Scorer(model, tokenizer, sets)
    base = {"retain": scorer.retain(), "forget": scorer.forget()}
    rows, grids = [], {}
    names: dict[str, int] = {}
    layer_cache: dict[tuple[int, str], _LayerActs] = {}
    for folder, sae, _ in saes_loaded:
        name = sae.cfg.arch if sae.cfg.arch not in names else f"{sae.cfg.arch}-{names[sae.cfg.arch]}"
        names[sae.cfg.arch] = names.get(sae.cfg.arch, 0) + 1
        res = sae_row(scorer, name, folder, cfg, retain_text, base, layer_cache)
        rows.append(res["row"])
        grids[name] = res["grid"]
    values_cache: dict[str, Any] = {}
    for method in cfg.editors:
        rows.append(edit_row(scorer, method, base, cfg, values_cache))
    out.mkdir(parents=True, exist_ok=True)
    split = (
        f"forget topic {cfg.forget_topic}: {len(sets.forget)} known questions; "
        f"retain: {len(sets.retain)} known questions from {sum(1 for t in sets.topics if t != cfg.forget_topic)} topics"
    )
    result = {
        "model": model_name(model),
        "config": config_to_dict(cfg),
        "split": split,
        "topics": sets.topics,
        "baseline": base,
        "rows": rows,
        "table": format_table(rows),
        "grids": grids,
        "forget_questions": [asdict(q) for q in sets.forget],
        "retain_questions": [asdict(q) for q in sets.retain],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    plot_rows(rows, out / "unlearning.png", f"{model_name(model)} — {split}")
    md = out / "table.md"
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{split}\n\n{result['table']}\n")
    os.chmod(tmp, file_mode())
    os.replace(tmp, md)
    _write_json(out / "unlearning.json", result)
    return result
