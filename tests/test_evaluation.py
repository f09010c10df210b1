"""Scoring and metrics on tiny models: batched == one at a time, NLL and ES by hand, BOS handling, entropy."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import head_input_contiguity, tiny_model, tiny_tokenizer
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from fastedit.evaluation import encode_pair, evaluate_requests, harmonic_mean, ngram_entropy, score_pairs
from fastedit.evaluation.fluency import generate
from fastedit.requests import EditRequest

PAIRS = [
    ("The capital of Italy is", "Rome"),
    ("Apple was founded by", "Steve Jobs and Einstein in Paris"),
    ("Berlin", "capital"),
    ("The mother tongue of Danielle Darrieux is", "French"),
]


def _nll_by_hand(model, tok, prompt, target):
    """Unbatched, full-logit reference: mean -log p of each target token given everything before it."""
    ids, n_prompt = encode_pair(tok, prompt, target)
    logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return -sum(float(logits[t - 1, ids[t]]) for t in range(n_prompt, len(ids))) / (len(ids) - n_prompt)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
@torch.no_grad()
def test_batched_scores_match_unbatched_by_hand(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    batched = score_pairs(model, tok, PAIRS, batch_size=3)  # mixed lengths: padding inside batches
    for (prompt, target), score in zip(PAIRS, batched, strict=True):
        assert score.nll == pytest.approx(_nll_by_hand(model, tok, prompt, target), abs=1e-5)
        assert score.n_tokens == len(encode_pair(tok, prompt, target)[0]) - encode_pair(tok, prompt, target)[1]
        assert score.prob == pytest.approx(math.exp(-score.nll))


def _bos_tokenizer() -> PreTrainedTokenizerFast:
    base = tiny_tokenizer()
    backend = base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", base.bos_token_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_bos_is_kept_once_and_target_tokens_follow_the_prompt():
    tok = _bos_tokenizer()
    ids, n_prompt = encode_pair(tok, "The capital of Italy is", "Rome")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[n_prompt:]) == " Rome"
    assert ids[:n_prompt] == tok("The capital of Italy is")["input_ids"]
    model = tiny_model("llama")
    with torch.no_grad():
        assert score_pairs(model, tok, PAIRS[:2])[0].nll == pytest.approx(_nll_by_hand(model, tok, *PAIRS[0]), abs=1e-5)


@torch.no_grad()
def test_counterfact_metrics_by_hand():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    req = EditRequest(
        case_id="c",
        prompt="The capital of {} is",
        subject="Italy",
        target_new="Paris",
        target_true="Rome",
        paraphrases=("Italy has the capital", "The Italian capital is"),
        neighborhood_prompts=("The capital of Germany is", "Berlin is the capital of"),
        neighborhood_answers=("Berlin", "Germany"),
    )
    metrics = evaluate_requests(model, tok, [req])
    nll = {
        (p, t): _nll_by_hand(model, tok, p, t)
        for p, t in [(q, x) for q in [req.rewrite_prompt(), *req.paraphrases] for x in ("Paris", "Rome")]
    }
    for q, a in zip(req.neighborhood_prompts, req.neighborhood_answers, strict=True):
        nll[(q, a)], nll[(q, "Paris")] = _nll_by_hand(model, tok, q, a), _nll_by_hand(model, tok, q, "Paris")
    rw = req.rewrite_prompt()
    es = float(nll[(rw, "Paris")] < nll[(rw, "Rome")])
    ps = sum(nll[(p, "Paris")] < nll[(p, "Rome")] for p in req.paraphrases) / 2
    ns = (
        sum(
            nll[(q, a)] < nll[(q, "Paris")]
            for q, a in zip(req.neighborhood_prompts, req.neighborhood_answers, strict=True)
        )
        / 2
    )
    em = math.exp(-nll[(rw, "Paris")]) - math.exp(-nll[(rw, "Rome")])
    s = metrics.summary
    assert s["n"] == 1
    assert (s["es"], s["ps"], s["ns"]) == pytest.approx((100 * es, 100 * ps, 100 * ns))
    assert s["em"] == pytest.approx(100 * em, abs=1e-4)
    assert s["score"] == pytest.approx(harmonic_mean([s["es"], s["ps"], s["ns"]]))
    assert metrics.cases[0]["rewrite"]["nll_true"] == pytest.approx(nll[(rw, "Rome")], abs=1e-5)


@torch.no_grad()
def test_metrics_without_true_answer_skip_es_but_keep_accuracy():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    summary = evaluate_requests(model, tok, [EditRequest("a", "{} plays", "Michael Jordan", "guitar")]).summary
    assert summary["es"] is None and summary["score"] is None
    assert 0 <= summary["rewrite_acc"] <= 100


def test_harmonic_mean():
    assert harmonic_mean([100, 50, 100]) == pytest.approx(75.0)
    assert harmonic_mean([100, 0, 50]) == 0.0
    assert harmonic_mean([None, 40, None]) == 40
    assert harmonic_mean([None]) is None


def test_ngram_entropy():
    # 4 distinct bigrams once each: H2 = 2 bits; 3 distinct trigrams: H3 = log2(3)
    assert ngram_entropy("a b c d e") == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert ngram_entropy("the the the the the") == 0.0  # one repeated n-gram: no entropy
    assert ngram_entropy("a") == 0.0


def test_fluency_generation_is_seeded():
    """Seeded samples; the LM head gets contiguous rows, the prefill's included (a strided view is a slow CPU path)."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with head_input_contiguity(model) as contiguous:
        a = generate(model, tok, ["The capital of", "Apple"], max_new_tokens=6, seed=3)
    assert contiguous and all(contiguous)
    assert a == generate(model, tok, ["The capital of", "Apple"], max_new_tokens=6, seed=3)
    assert len(a) == 2 and all(isinstance(t, str) for t in a)
    req = EditRequest("a", "{} is", "Rome", "big", generation_prompts=("Rome is a city",))
    assert evaluate_requests(model, tok, [req], fluency=True, fluency_tokens=8).summary["fluency"] >= 0


@pytest.mark.real
def test_unedited_smollm2_counterfact_metrics(smollm2, counterfact):
    """The unedited model on the first 30 flat CounterFact cases: NS ~67, ES low."""

    from fastedit.requests import load_requests

    model, tok = smollm2
    summary = evaluate_requests(model, tok, load_requests(counterfact, n=30).requests).summary
    assert summary["n"] == 30
    assert 55 <= summary["ns"] <= 80
    assert summary["es"] <= 50 and summary["em"] < 0


@pytest.mark.real
@pytest.mark.parametrize("fixture", ["gemma3", "smollm2"])
def test_real_models_know_the_project_facts(fixture, request):
    """data/known-facts.json: facts the real models (Gemma 3 270M is the default) know: ES 0 / NS high unedited."""
    model, tok = request.getfixturevalue(fixture)
    summary = evaluate_requests(model, tok, "data/known-facts.json").summary
    assert summary["es"] == 0 and summary["ps"] <= 25 and summary["ns"] >= 80
