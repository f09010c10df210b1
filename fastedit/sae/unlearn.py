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
 4. keep configurations that pass the retain gate: at most ⌊retain_max_drop · n_retain⌋ of the retain
    questions (all answered by the unedited model) may flip, e.g. 3 of 300 for 1 % (each grid is scored weakest
    clamp first; by default, once one fails the gate the stronger clamps of the same features are recorded as
    skipped, not scored: ``skip_stronger_after_fail``, a time saving SAEBench does not make; and the retain
    scoring of a clamp stops once the gate has failed: ``stop_retain_at_gate_fail``); the score of the SAE is
    1 − (lowest forget accuracy among kept configurations); 0.0 when only the unclamped model passes.
Accuracy = share of the questions whose true answer still beats the counterfactual (`questions.py`).
Editing rows: MEMIT and EMMET rewrite every forget fact to its CounterFact ``target_new``, given the rewrite prompt
only; the same retain gate and score apply. Weights are restored after each edit.

Fairness: every row is scored on the same questions, and forgetting on the held-out paraphrase of each forget
question (never shown to an editor, left out of the SAE forget corpus); the model answers both the paraphrase
and the rewrite prompt of every forget question before any intervention. Accuracy on the rewrite prompt (the one
an editor installs its edit on) is reported separately as ``forget_acc_installed``. The unedited model's scores
come from the question selection and are not recomputed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastedit.arch import arch_for, edit_output, model_device, restored_after
from fastedit.atomic import write_text, write_with
from fastedit.config import config_to_dict
from fastedit.data import resolve_data
from fastedit.errors import FasteditError
from fastedit.models import model_name, placement
from fastedit.sae.activations import check_sae_corpus, hook_path, read_corpus, stream_activations
from fastedit.sae.api import check_fits, model_and_tokenizer
from fastedit.sae.io import SAEInfo, load_sae
from fastedit.sae.model import SAE
from fastedit.sae.questions import (
    Question,
    QuestionSets,
    build_question_sets,
    default_counterfact,
    make_probe,
    score_in_batches,
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
    # Retain gate: a configuration is kept when at most ⌊retain_max_drop · retain_questions⌋ retain answers flip
    # (0.01 of 300 = 3 questions, i.e. retain accuracy ≥ 0.99).
    retain_max_drop: float = 0.01
    # Clamps of one feature set are scored weakest first; once one fails the retain gate, the stronger ones of the
    # same grid are recorded as skipped instead of scored (they move the residual further; False scores them all).
    skip_stronger_after_fail: bool = True
    # A clamp's retain scoring stops once more answers flipped than the gate allows (its exact retain accuracy is
    # then not known and recorded as null, with the flips counted so far).
    stop_retain_at_gate_fail: bool = True
    retain_corpus_tokens: int = 20_000
    candidates_per_topic: int = 200  # cap on the cases scored per topic (retain topics stop at their share)
    max_forget: int = 40
    retain_questions: int = 300  # spread evenly over the topics other than the forget topic
    min_forget: int = 20
    batch_size: int = 32  # questions per forward
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
    # computed on the SAE's device in float32; the change goes back to the model's device and dtype
    features, values = features.to(sae.device), values.to(sae.device)
    dec = sae.decoder()[features] * sae.scale  # (n, d_in) raw-space decoder rows

    def fn(h: torch.Tensor) -> torch.Tensor:
        z = sae.encode(h.to(sae.device, torch.float32))[..., features]  # (b, s, n)
        active = z > 0
        if mask.value is not None and mask.value.shape == active.shape[:2]:
            active &= mask.value.to(sae.device)[..., None]
        delta = torch.where(active, -values - z, torch.zeros_like(z))
        return h + (delta @ dec).to(h.device, h.dtype)

    with edit_output(model, hook_path(model, info.layer, info.site), fn):
        yield


@dataclass(frozen=True)
class RetainGate:
    """Kept = at most ``max_flipped`` of the ``questions`` retain answers (all right before) turned wrong."""

    questions: int
    max_drop: float

    @property
    def max_flipped(self) -> int:
        return math.floor(self.max_drop * self.questions + 1e-9)

    def passes(self, flipped: int) -> bool:
        return flipped <= self.max_flipped

    def describe(self) -> str:
        k, n = self.max_flipped, self.questions
        return f"at most {k} of {n} retain answers may flip (retain accuracy ≥ {(n - k) / n:.3f})"

    def as_dict(self) -> dict[str, Any]:
        k, n = self.max_flipped, self.questions
        return {"retain_questions": n, "max_drop": self.max_drop, "max_flipped": k, "min_retain_acc": (n - k) / n}


@dataclass
class RetainScore:
    flipped: int  # retain answers now wrong (of those scored)
    scored: int
    total: int

    @property
    def acc(self) -> float | None:
        """Retain accuracy, or None when scoring stopped early (the gate had already failed)."""
        return 1.0 - self.flipped / self.total if self.scored == self.total else None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"retain_acc": self.acc, "retain_flipped": self.flipped}
        if self.scored < self.total:
            out["retain_scored"] = self.scored  # stopped once the gate had failed
        return out


@dataclass
class Scorer:
    """Forget/retain accuracy of the model as it is (hooks active), on fixed question sets tokenised once.

    Retain questions are scored on their rewrite prompt; forget questions on their held-out paraphrase
    (``forget_acc``) and on the rewrite prompt an editor installs its edit on (``forget_acc_installed``).
    """

    model: torch.nn.Module
    tokenizer: Any
    sets: QuestionSets
    batch_size: int = 32
    mask: _Mask = field(default_factory=_Mask)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self._retain = [make_probe(tok, q.prompt, q.true, q.new) for q in self.sets.retain]
        self._forget = [make_probe(tok, q.rephrase, q.true, q.new) for q in self.sets.forget]
        self._installed = [make_probe(tok, q.prompt, q.true, q.new) for q in self.sets.forget]

    def _flags(self, probes: Sequence[Any], stop: int | None = None) -> torch.Tensor:
        wins, _ = score_in_batches(
            self.model,
            self.tokenizer,
            probes,
            batch_size=self.batch_size,
            set_mask=self.mask.set,
            stop_after_misses=stop,
        )
        return wins

    def retain(self, stop_after_flips: int | None = None) -> RetainScore:
        wins = self._flags(self._retain, stop_after_flips)
        return RetainScore(int((~wins).sum()), len(wins), len(self._retain))

    def forget(self) -> dict[str, float]:
        return {
            "forget_acc": float(self._flags(self._forget).double().mean()),
            "forget_acc_installed": float(self._flags(self._installed).double().mean()),
        }


def sae_row(
    scorer: Scorer,
    name: str,
    folder: str | Path,
    cfg: UnlearnConfig,
    retain_text: str,
    base: dict[str, float],
    cache: dict[tuple[int, str], _LayerActs] | None = None,
    gate: RetainGate | None = None,
) -> dict[str, Any]:
    """Run the clamp grid of one SAE; returns its table row (best kept config) and the whole grid."""
    t0 = time.perf_counter()
    model, tok = scorer.model, scorer.tokenizer
    gate = gate or RetainGate(len(scorer.sets.retain), cfg.retain_max_drop)
    stop = gate.max_flipped if cfg.stop_retain_at_gate_fail else None
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
                retain = scorer.retain(stop)
                passed = gate.passes(retain.flipped)
                # The forget set is only scored where the retain gate passes (the others cannot be kept).
                forget = scorer.forget() if passed else {}
            seen[key] = {**retain.as_dict(), **forget, "kept": passed}
            if not passed:
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
            forget_acc_installed=base["forget_installed"],
            retain_acc=base["retain"],
            score=0.0,
            note=f"no clamp configuration passed the retain gate ({gate.describe()})",
        )
    else:
        row.update(
            forget_acc=best["forget_acc"],
            forget_acc_installed=best["forget_acc_installed"],
            retain_acc=best["retain_acc"],
            score=max(0.0, 1.0 - best["forget_acc"]),
            config={k: best[k] for k in ("retain_threshold", "n", "grid", "multiplier")},
            note=f"best kept configuration uses the {best['grid']} grid",
        )
    return {"row": row, "grid": grid}


def _shared_targets(
    model: torch.nn.Module, tok: Any, requests: Sequence[Any], hp: Any, cache: dict[str, Any]
) -> tuple[Any, bool]:
    """v* targets of ``requests`` under ``hp`` (`compute_targets`, the editors' public v* API), computed once
    per values key and shared between editing rows; returns (targets, whether they were shared)."""
    from fastedit.editing.engine import compute_targets
    from fastedit.editing.values import values_key

    key = values_key(arch_for(model), hp)
    if key in cache:
        return cache[key], True
    cache[key] = compute_targets(model, tok, requests, method=hp.method, hparams=hp)
    return cache[key], False


def edit_row(
    scorer: Scorer,
    method: str,
    base: dict[str, float],
    cfg: UnlearnConfig,
    values_cache: dict[str, Any] | None = None,
    gate: RetainGate | None = None,
) -> dict[str, Any]:
    """Rewrite every forget fact to its counterfactual with ``method`` (MEMIT/EMMET), score, restore.

    The editor is given the rewrite prompt only (no paraphrases); forgetting is scored on the held-out paraphrase.
    ``values_cache`` (values key -> v* targets) lets MEMIT and EMMET share one v* optimisation when their
    hparams ask for the same targets; a row that reused targets says so.
    """
    row: dict[str, Any] = {"method": method, "kind": "edit"}
    gate = gate or RetainGate(len(scorer.sets.retain), cfg.retain_max_drop)
    t0 = time.perf_counter()
    try:
        from fastedit.editing.engine import apply_edit
        from fastedit.editing.hparams import hparams_path, load_hparams
        from fastedit.requests import EditRequest
        from fastedit.stats import ensure_stats
    except ImportError as exc:
        log.warning("%s row: editors missing (%s)", method, exc)
        return {**row, "forget_acc": None, "retain_acc": None, "score": None, "note": "not available: editors missing"}
    model, tok = scorer.model, scorer.tokenizer
    requests = [_request(q, EditRequest) for q in scorer.sets.forget]
    values_cache = {} if values_cache is None else values_cache
    try:
        hp_file = cfg.editor_hparams.get(method) or hparams_path(method, model)
        hp = load_hparams(method, model, hp_file)
        # C0 from the retain corpus when one is named, else the default corpus (wikitext-2 data set or model text)
        computed = ensure_stats(model, tok, list(hp.layers), dm=10, corpus=cfg.corpus or None)
        stats = {layer: ks.mean for layer, ks in computed.items()}  # C0 per edited layer
        values, shared = _shared_targets(model, tok, requests, hp, values_cache)
        with restored_after(model, arch_for(model), hp.layers):
            apply_edit(model, tok, requests, method=method, hparams=hp, stats=stats, values=values)
            retain, forget = scorer.retain(), scorer.forget()
    except Exception as exc:  # an editor failure must not sink the other rows
        log.exception("%s edit failed", method)
        return {**row, "forget_acc": None, "retain_acc": None, "score": None, "note": f"failed: {exc}"}
    passed = gate.passes(retain.flipped)
    raw = 1 - forget["forget_acc"]
    note = "retain gate passed" if passed else f"retain gate failed (raw score {raw:.3f}); scored 0.0"
    return {
        **row,
        **forget,
        "retain_acc": retain.acc,
        "retain_flipped": retain.flipped,
        "score": max(0.0, raw) if passed else 0.0,
        "seconds": round(time.perf_counter() - t0, 1),
        "hparams": {"file": Path(hp_file).name, **config_to_dict(hp)},  # resolved values, no machine path
        "note": note + ("; v* targets shared with an earlier row" if shared else ""),
    }


def _request(q: Question, cls: Any) -> Any:
    """The edit request of a forget question: rewrite prompt only; the paraphrase stays held out."""
    return cls(
        case_id=q.case_id,
        prompt=q.prompt.replace(q.subject, "{}", 1),
        subject=q.subject,
        target_new=q.new,
        target_true=q.true,
    )


def _write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str))


TABLE_COLUMNS = (
    ("forget_acc", "forget acc (held-out paraphrase)"),
    ("forget_acc_installed", "forget acc (installed prompt)"),
    ("retain_acc", "retain acc"),
    ("score", "unlearning score"),
    ("seconds", "wall time (s)"),
)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    def f(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [
        "| method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | note |",
        "|---|" + "---|" * len(TABLE_COLUMNS) + "---|",
    ]
    for r in rows:
        cells = " | ".join(f(r.get(key)) for key, _ in TABLE_COLUMNS)
        lines.append(f"| {r['method']} | {cells} | {r.get('note', '')} |")
    return "\n".join(lines)


def protocol_note(cfg: UnlearnConfig, sets: QuestionSets, gate: RetainGate) -> str:
    """The header of table.md: what the numbers mean."""
    n_topics = sum(1 for t, v in sets.topics.items() if t != cfg.forget_topic and v["used"])
    return (
        f"Forget topic {cfg.forget_topic}: {len(sets.forget)} CounterFact questions the unedited model answers "
        "(true answer beats the counterfactual) on both the rewrite prompt and a held-out paraphrase; retain: "
        f"{len(sets.retain)} questions it answers, spread over {n_topics} other topics. Every row is scored on the "
        "same questions. Forget accuracy is measured on the held-out paraphrases, which no method sees (editors get "
        "the rewrite prompt only; the SAE forget corpus holds rewrite-prompt statements only); the installed-prompt "
        "column is the accuracy on the rewrite prompt the editors install their edit on. Retain gate: "
        f"{gate.describe()}. Unlearning score = 1 − forget acc (held-out paraphrase) of the best configuration "
        "that passes the gate, 0.0 when none does."
    )


def plot_rows(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    x = torch.arange(len(rows)).tolist()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    bars = (
        ("forget_acc", "forget acc (paraphrase)"),
        ("forget_acc_installed", "forget acc (installed prompt)"),
        ("retain_acc", "retain acc"),
        ("score", "score"),
    )
    w = 0.2
    for j, (key, label) in enumerate(bars):
        off = (j - (len(bars) - 1) / 2) * w
        ax.bar([i + off for i in x], [r.get(key) or 0.0 for r in rows], width=w, label=label)
    ax.set_xticks(x, names, rotation=20)
    ax.set_ylim(0, 1.05)
    import textwrap

    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


OUTPUTS = ("unlearning.json", "table.md", "unlearning.png")


def run_unlearning(
    model: Any,
    saes: Sequence[str | Path],
    out: str | Path,
    *,
    tokenizer: Any = None,
    config: UnlearnConfig | None = None,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The comparison: every SAE's clamp grid, then MEMIT and EMMET, on one forget/retain question split.

    Writes ``unlearning.json`` (config, gate, question split with case ids, rows, every grid point),
    ``table.md`` and ``unlearning.png`` into ``out``; returns the JSON content. An earlier result in ``out`` is
    only replaced with ``overwrite``. A model given by name loads on ``device`` in ``dtype`` (`models.placement`).
    """
    cfg = config or UnlearnConfig()
    placed = placement(device, dtype)  # a bad --device/--dtype fails here, before any work
    out = Path(out)
    _check_inputs(cfg, out, overwrite)
    saes_loaded = [(Path(s), *load_sae(s)) for s in saes]  # fail early on a bad folder, before any long work
    model, tokenizer = model_and_tokenizer(model, tokenizer, placed)
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
        retain_questions=cfg.retain_questions,
        min_forget=cfg.min_forget,
        batch_size=cfg.batch_size,
    )
    select_s = time.perf_counter() - t0
    gate = RetainGate(len(sets.retain), cfg.retain_max_drop)
    scorer = Scorer(model, tokenizer, sets, batch_size=cfg.batch_size)
    # Every selected question is answered by the unedited model (on each prompt it is scored on), so the
    # baseline is 1.0 by construction; the selection's scores are reused, not recomputed.
    base = {"retain": 1.0, "forget": 1.0, "forget_installed": 1.0}
    retain_text = read_corpus(
        cfg.corpus or None, part="train", tokens=cfg.retain_corpus_tokens, model=model, tokenizer=tokenizer
    )
    rows, grids = [], {}
    names: dict[str, int] = {}
    layer_cache: dict[tuple[int, str], _LayerActs] = {}
    for folder, sae, _ in saes_loaded:
        name = sae.cfg.arch if sae.cfg.arch not in names else f"{sae.cfg.arch}-{names[sae.cfg.arch]}"
        names[sae.cfg.arch] = names.get(sae.cfg.arch, 0) + 1
        res = sae_row(scorer, name, folder, cfg, retain_text, base, layer_cache, gate)
        rows.append(res["row"])
        grids[name] = res["grid"]
    values_cache: dict[str, Any] = {}
    for method in cfg.editors:
        rows.append(edit_row(scorer, method, base, cfg, values_cache, gate))
    seconds = {"question_selection": round(select_s, 1), "total": round(time.perf_counter() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    result = _result(model, cfg, sets, gate, base, rows, grids, seconds)
    plot_rows(rows, out / "unlearning.png", f"{model_name(model)} — {result['split']['summary']}")
    write_text(out / "table.md", f"{result['protocol']}\n\n{result['table']}\n")
    _write_json(out / "unlearning.json", result)
    return result


def _check_inputs(cfg: UnlearnConfig, out: Path, overwrite: bool) -> None:
    """Everything checkable before the model loads: the question file, the retain corpus, the outputs, the gate."""
    questions = resolve_data(cfg.counterfact) if cfg.counterfact else default_counterfact()
    if not questions.is_file():
        raise FasteditError(f"--counterfact {cfg.counterfact!r} is neither a file nor a data set; pass a flat "
                            "CounterFact file or `fastedit data add counterfact FILE`")  # fmt: skip
    check_sae_corpus(cfg.corpus or None)
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise FasteditError(
            f"{out} already holds {', '.join(existing)}; pass --overwrite to replace it or choose another --out"
        )
    if cfg.retain_questions < 1 or not 0 <= cfg.retain_max_drop < 1:
        raise FasteditError(
            f"retain_questions must be ≥ 1 and retain_max_drop in [0, 1); got {cfg.retain_questions}, "
            f"{cfg.retain_max_drop}"
        )


def _result(
    model: Any,
    cfg: UnlearnConfig,
    sets: QuestionSets,
    gate: RetainGate,
    base: dict[str, float],
    rows: list[dict[str, Any]],
    grids: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """The content of ``unlearning.json``: config, protocol, gate, the question split with case ids, rows, grids."""
    summary = (
        f"forget topic {cfg.forget_topic}: {len(sets.forget)} questions (answered on rewrite prompt and held-out "
        f"paraphrase; scored on the paraphrase); retain: {len(sets.retain)} questions from "
        f"{sum(1 for t, v in sets.topics.items() if t != cfg.forget_topic and v['used'])} topics; "
        f"gate: {gate.describe()}"
    )
    return {
        "model": model_name(model),
        "placement": {"device": str(model_device(model)), "dtype": str(next(model.parameters()).dtype)},
        "config": config_to_dict(cfg),
        "protocol": protocol_note(cfg, sets, gate),
        "gate": gate.as_dict(),
        "split": {
            "summary": summary,
            "forget_topic": cfg.forget_topic,
            "forget_case_ids": [q.case_id for q in sets.forget],
            "retain_case_ids": [q.case_id for q in sets.retain],
            "forget_scored_on": "rephrase (held-out paraphrase); forget_acc_installed: prompt",
            "retain_scored_on": "prompt",
        },
        "topics": sets.topics,
        "baseline": base,
        "rows": rows,
        "table": format_table(rows),
        "grids": grids,
        "forget_questions": [asdict(q) for q in sets.forget],
        "retain_questions": [asdict(q) for q in sets.retain],
        "seconds": seconds,
    }
