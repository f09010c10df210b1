"""Evaluation of edits: CounterFact ES/PS/NS/Score and magnitudes, zsRE token accuracy, generation fluency."""

from fastedit.evaluation.fluency import generate, ngram_entropy
from fastedit.evaluation.metrics import Metrics, evaluate_requests, harmonic_mean, summarize
from fastedit.evaluation.scoring import TargetScore, encode_pair, score_pairs

__all__ = [
    "Metrics",
    "TargetScore",
    "encode_pair",
    "evaluate_requests",
    "generate",
    "harmonic_mean",
    "ngram_entropy",
    "score_pairs",
    "summarize",
]
