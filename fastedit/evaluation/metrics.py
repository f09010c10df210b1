"""CounterFact and zsRE metrics of edit requests, computed from one batched scoring pass.

For every request (targets scored as the mean per-token NLL of " " + target, teacher forced):
- ES (efficacy): P(new) > P(true) on the rewrite prompt; PS: the same, averaged over the paraphrases;
  NS (neighbourhood): P(answer) > P(new) on each neighbourhood prompt, answer = its own true answer
  (flat: locality_ground_truth, zsRE: loc_ans) or the case's target_true (original CounterFact).
- EM/PM/NM: the matching probability differences p(new) − p(true) (NM: p(answer) − p(new)), p = exp(−NLL).
- Score: harmonic mean of ES, PS, NS (over those defined).
- zsRE-style token accuracy: share of target tokens that are the argmax, on the rewrite and paraphrase
  prompts (target_new) and the neighbourhood prompts (their answer).
All summary numbers are percentages averaged over cases; a metric a case cannot define (no target_true, no
paraphrase) is left out for that case and ``None`` when no case defines it.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastedit.evaluation.fluency import generate, ngram_entropy
from fastedit.evaluation.scoring import TargetScore, score_pairs
from fastedit.requests import EditRequest, as_requests

log = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "es",
    "ps",
    "ns",
    "score",
    "em",
    "pm",
    "nm",
    "rewrite_acc",
    "paraphrase_acc",
    "neighborhood_acc",
    "fluency",
)


@dataclass
class Metrics:
    """Summary (percentages, ``n`` cases) and one dict per case (same order as the requests)."""

    summary: dict[str, Any]
    cases: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]


def _mean(values: Sequence[float]) -> float | None:
    return float(statistics.fmean(values)) if values else None


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of the defined values (0 when any is 0; None when none is defined)."""
    defined = [v for v in values if v is not None]
    if not defined:
        return None
    if any(v <= 0 for v in defined):
        return 0.0
    return len(defined) / sum(1 / v for v in defined)


def _pairs_of(request: EditRequest) -> dict[str, list[tuple[str, str]]]:
    """The (prompt, target) pairs one request needs, grouped by what they measure."""
    rewrite = request.rewrite_prompt()
    new, true = request.target_new, request.target_true
    groups: dict[str, list[tuple[str, str]]] = {"rewrite_new": [(rewrite, new)], "rewrite_true": []}
    groups["para_new"] = [(p, new) for p in request.paraphrases]
    groups["para_true"] = []
    if true is not None:
        groups["rewrite_true"] = [(rewrite, true)]
        groups["para_true"] = [(p, true) for p in request.paraphrases]
    answers = request.neighborhood_answers or ((true,) * len(request.neighborhood_prompts) if true else ())
    groups["nb_new"] = [(q, new) for q in request.neighborhood_prompts[: len(answers)]]
    groups["nb_true"] = list(zip(request.neighborhood_prompts[: len(answers)], answers, strict=True))
    return groups


def _case_metrics(request: EditRequest, s: dict[str, list[TargetScore]]) -> dict[str, Any]:
    case: dict[str, Any] = {"case_id": request.case_id}
    rw_new = s["rewrite_new"][0]
    case["rewrite"] = {"nll_new": rw_new.nll, "acc_new": rw_new.accuracy}
    case["rewrite_acc"] = rw_new.accuracy
    case["paraphrase_acc"] = _mean([x.accuracy for x in s["para_new"]])
    case["neighborhood_acc"] = _mean([x.accuracy for x in s["nb_true"]])
    if s["rewrite_true"]:
        rw_true = s["rewrite_true"][0]
        case["rewrite"]["nll_true"] = rw_true.nll
        case["es"] = float(rw_new.nll < rw_true.nll)
        case["em"] = rw_new.prob - rw_true.prob
    if s["para_true"]:
        pairs = list(zip(s["para_new"], s["para_true"], strict=True))
        case["paraphrase"] = [{"nll_new": a.nll, "nll_true": b.nll} for a, b in pairs]
        case["ps"] = _mean([float(a.nll < b.nll) for a, b in pairs])
        case["pm"] = _mean([a.prob - b.prob for a, b in pairs])
    if s["nb_true"]:
        pairs = list(zip(s["nb_new"], s["nb_true"], strict=True))
        case["neighborhood"] = [{"nll_new": a.nll, "nll_answer": b.nll} for a, b in pairs]
        case["ns"] = _mean([float(b.nll < a.nll) for a, b in pairs])
        case["nm"] = _mean([b.prob - a.prob for a, b in pairs])
    return case


def summarize(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Average the per-case metrics into percentages; Score is the harmonic mean of ES, PS, NS."""
    summary: dict[str, Any] = {"n": len(cases)}
    for key in SUMMARY_KEYS:
        if key == "score":
            continue
        values = [c[key] for c in cases if c.get(key) is not None]
        mean = _mean(values)
        # fluency is in bits, not a share
        summary[key] = None if mean is None else (mean if key == "fluency" else 100 * mean)
    summary["score"] = harmonic_mean([summary["es"], summary["ps"], summary["ns"]])
    return {k: summary.get(k) for k in ("n", *SUMMARY_KEYS)}


def evaluate_requests(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Any,
    *,
    batch_size: int = 16,
    fluency: bool = False,
    fluency_tokens: int = 100,
    fluency_prompts: int = 2,
    seed: int = 0,
    desc: str = "evaluating",
) -> Metrics:
    """CounterFact (ES/PS/NS/Score, EM/PM/NM) and zsRE token accuracies of ``model`` on ``requests``.

    Every distinct (prompt, target) pair is scored once, in batches of ``batch_size``. With ``fluency``, the
    first ``fluency_prompts`` generation prompts of each case (else its rewrite prompt) are continued by
    ``fluency_tokens`` seeded top-k samples and their n-gram entropy is averaged per case. ``desc`` names the
    progress bar (hidden by ``fastedit -q``).
    """
    requests = as_requests(requests)
    groups = [_pairs_of(r) for r in requests]
    unique = list(dict.fromkeys(p for g in groups for pairs in g.values() for p in pairs))
    was_training = model.training
    model.eval()
    try:
        scored = dict(zip(unique, score_pairs(model, tokenizer, unique, batch_size=batch_size, desc=desc), strict=True))
        cases = []
        for request, g in zip(requests, groups, strict=True):
            cases.append(_case_metrics(request, {k: [scored[p] for p in v] for k, v in g.items()}))
        if fluency:
            prompts = [list(r.generation_prompts[:fluency_prompts]) or [r.rewrite_prompt()] for r in requests]
            flat = [p for ps in prompts for p in ps]
            log.info("%s: generating %d continuations for fluency", desc, len(flat))
            texts = iter(generate(model, tokenizer, flat, max_new_tokens=fluency_tokens, seed=seed))
            for case, ps in zip(cases, prompts, strict=True):
                case["fluency"] = _mean([ngram_entropy(next(texts)) for _ in ps])
    finally:
        model.train(was_training)
    return Metrics(summarize(cases), cases)
