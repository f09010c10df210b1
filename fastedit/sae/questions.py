"""Offline question sets: CounterFact facts the model demonstrably knows, grouped into topics; WMDP/MMLU files.

Topics come from the relation wording of each CounterFact prompt: the template is the prompt with the subject
replaced by ``{}``, and the first matching keyword group wins, in the order of ``TOPIC_RULES`` (e.g. "The
language of {} is" -> languages, "{} plays as" -> sports_music). A question is *answered* on a prompt when the
model gives the true answer a lower mean per-token NLL than the counterfactual target (the two-way test of
DESIGN.md); ``top1`` records whether the true answer's first token is also the model's first choice. Accuracy
under an intervention is the share of questions still answered on the same prompt.

Each question carries two prompts: the rewrite prompt (``prompt``, the one an editor installs its edit on) and a
held-out paraphrase (``rephrase``: the flat layout's ``rephrase_prompt``, the original layout's first
``paraphrase_prompts`` entry). Forget questions are kept only when the model answers both; forgetting is scored
on the paraphrase, which no method sees (it is also left out of the forget corpus).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastedit.arch import model_device
from fastedit.arch.forward import last_logits_only
from fastedit.errors import FasteditError, RequestError

log = logging.getLogger(__name__)

TOPIC_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("languages", ("language", "speak", "speaker", "writes in", "mother tongue", "understand")),
    ("sports_music", ("plays", "play", "position", "instrument", "perform", "genre", "sport")),
    ("broadcasters", ("aired on", "premiere", "debut", "released on")),
    ("companies", ("developed by", "created by", "produced by", "product of", "owner", "owned by", "headquarter")),
    ("occupations_religions", ("profession", "occupation", "works as", "expertise", "religion", "field of work")),
    ("citizenship_work", ("citizen", "employ", "work", "born in", "died", "passed away", "life ended", "expired")),
    ("places", ("located", "twin city", "continent", "capital", "country", " in", "within", "from", "native to")),
)


def topic_of(prompt: str, subject: str) -> str:
    template = prompt.replace(subject, "{}").lower()
    for topic, words in TOPIC_RULES:
        if any(w in template for w in words):
            return topic
    return "other"


@dataclass(frozen=True)
class Question:
    case_id: str
    topic: str
    prompt: str  # rewrite prompt, subject filled in (what an editor is given)
    subject: str
    true: str  # ground truth, no leading space
    new: str  # the counterfactual target
    rephrase: str = ""  # held-out paraphrase (what forgetting is scored on)
    top1: bool = False


def default_counterfact() -> Path:
    """The flat CounterFact file: the ``counterfact`` data set (a one-line error says how to add it)."""
    from fastedit.data import dataset_path

    return dataset_path("counterfact")


def read_counterfact(path: str | Path | None = None) -> list[Question]:
    """Every case of a CounterFact file (flat or original layout) as an (unscored) question with its topic.

    Records are parsed by the editors' request reader (`fastedit.requests.load_requests`); invalid ones
    (e.g. target_new equal to the true answer) are skipped.
    """
    from fastedit.data import resolve_data
    from fastedit.requests import load_requests

    path = resolve_data(path) if path is not None else default_counterfact()
    if not path.exists():
        raise FasteditError(
            f"CounterFact file {str(path)!r} does not exist; pass --counterfact FILE or a data-set name (counterfact)"
        )
    try:
        parsed = load_requests(path, skip_invalid=True)
    except RequestError as exc:
        raise FasteditError(f"{path}: not a CounterFact file ({str(exc).splitlines()[0]})") from None
    if parsed.layout not in ("flat", "original"):
        raise FasteditError(
            f"{path}: {parsed.layout}-layout records; the question sets need CounterFact (flat or original layout)"
        )
    out = []
    for r in parsed.requests:
        if r.target_true is None:
            continue
        prompt = r.rewrite_prompt()
        out.append(
            Question(
                case_id=r.case_id,
                topic=topic_of(prompt, r.subject),
                prompt=prompt,
                subject=r.subject,
                true=r.target_true.strip(),
                new=r.target_new.strip(),
                rephrase=r.paraphrases[0] if r.paraphrases else "",
            )
        )
    return out


def topic_texts(questions: Sequence[Question]) -> list[str]:
    """The forget corpus: each fact stated as text on its rewrite prompt (paraphrases stay held out)."""
    return [f"{q.prompt} {q.true}." for q in questions]


# ---- the two-way test, one short forward per question ------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One (prompt, true, new) question, tokenised for scoring.

    A row is prompt + answer[:-1] for one answer: its last len(answer) positions predict the answer's tokens.
    The other answer is read from the same row when all but its last token are a prefix of that answer (always
    so for single-token answers), else from a second row. ``reads`` = ((row, ids) of true, (row, ids) of new).
    """

    rows: tuple[tuple[int, ...], ...]
    answer_lens: tuple[int, ...]
    reads: tuple[tuple[int, tuple[int, ...]], tuple[int, tuple[int, ...]]]


def make_probe(tokenizer: Any, prompt: str, true: str, new: str) -> Probe:
    p_ids = list(tokenizer(prompt)["input_ids"])
    t_ids = tuple(tokenizer(" " + true, add_special_tokens=False)["input_ids"])
    n_ids = tuple(tokenizer(" " + new, add_special_tokens=False)["input_ids"])
    if not t_ids or not n_ids:
        raise FasteditError(f"empty answer after tokenising {true!r} / {new!r} (prompt {prompt!r})")
    long_, short = (t_ids, n_ids) if len(t_ids) >= len(n_ids) else (n_ids, t_ids)
    rows = [tuple(p_ids) + long_[:-1]]
    lens = [len(long_)]
    short_row = 0
    if short[:-1] != long_[: len(short) - 1]:
        rows.append(tuple(p_ids) + short[:-1])
        lens.append(len(short))
        short_row = 1
    read_long, read_short = (0, long_), (short_row, short)
    reads = (read_long, read_short) if long_ is t_ids else (read_short, read_long)
    return Probe(tuple(rows), tuple(lens), reads)


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp_min(0)


@torch.no_grad()
def score_probes(
    model: torch.nn.Module,
    probes: Sequence[Probe],
    *,
    pad_id: int = 0,
    bos_id: int | None = None,
    set_mask: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) bool true answer wins (lower mean NLL than new), (n,) bool true first token ranked first: one batch.

    Rows are left-padded so every answer ends the sequence and only the last max(len(answer)) positions need
    logits (`last_logits_only`): with a 262k vocabulary the LM head otherwise dominates the cost. ``set_mask``
    receives the (rows, seq) mask of real non-BOS tokens before the forward (for hooks).
    """
    if not probes:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)
    rows = [r for p in probes for r in p.rows]
    lens = [n for p in probes for n in p.answer_lens]
    device = model_device(model)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    if set_mask is not None:
        set_mask(mask.bool() & (ids != bos_id) if bos_id is not None else mask.bool())
    keep = max(lens)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), **last_logits_only(model, keep)
    ).logits.float()  # (rows, keep, V): row i's answer token j is predicted at keep − lens[i] + j
    logz = logits.logsumexp(-1)  # (rows, keep)
    wins = torch.zeros(len(probes), dtype=torch.bool)
    top1 = torch.zeros(len(probes), dtype=torch.bool)
    first_row = 0
    for k, p in enumerate(probes):
        nll = []
        for row, tgt in p.reads:
            i = first_row + row
            pos = torch.arange(len(tgt), device=device) + keep - lens[i]
            tok = torch.tensor(tgt, device=device)
            nll.append(float((logz[i, pos] - logits[i, pos, tok]).mean()))
        row_t, tgt_t = p.reads[0]
        i_t = first_row + row_t
        top1[k] = int(logits[i_t, keep - lens[i_t]].argmax()) == tgt_t[0]
        wins[k] = nll[0] < nll[1]
        first_row += len(p.rows)
    return wins, top1


def accuracy_flags(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    on: str = "prompt",
    batch_size: int = 32,
    set_mask: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) bool: true answer beats the counterfactual; (n,) bool: true answer's first token ranked first.

    ``on``: "prompt" (the rewrite prompt) or "rephrase" (the held-out paraphrase).
    """
    probes = [make_probe(tokenizer, getattr(q, on), q.true, q.new) for q in questions]
    return score_in_batches(model, tokenizer, probes, batch_size=batch_size, set_mask=set_mask)


def score_in_batches(
    model: torch.nn.Module,
    tokenizer: Any,
    probes: Sequence[Probe],
    *,
    batch_size: int = 32,
    set_mask: Callable[[torch.Tensor], None] | None = None,
    stop_after_misses: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`score_probes` over batches; with ``stop_after_misses`` it stops once more questions than that are missed
    (the flags returned then cover only the questions scored)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    wins, top1 = [torch.zeros(0, dtype=torch.bool)], [torch.zeros(0, dtype=torch.bool)]
    misses = 0
    for start in range(0, len(probes), batch_size):
        w, t = score_probes(
            model, probes[start : start + batch_size], pad_id=pad, bos_id=tokenizer.bos_token_id, set_mask=set_mask
        )
        wins.append(w)
        top1.append(t)
        misses += int((~w).sum())
        if stop_after_misses is not None and misses > stop_after_misses:
            break
    return torch.cat(wins), torch.cat(top1)


# ---- question selection -----------------------------------------------------------------------------------


@dataclass
class QuestionSets:
    forget: list[Question]
    retain: list[Question]
    topics: dict[str, dict[str, int]]  # topic -> {"cases", "scored", "known", "known_top1", "used"}
    forget_corpus: list[str]


def _known(
    model: torch.nn.Module, tokenizer: Any, cases: Sequence[Question], *, paraphrase: bool, batch_size: int
) -> list[Question]:
    """The cases the model answers on the rewrite prompt (and, with ``paraphrase``, on the paraphrase too);
    ``top1`` is taken on the prompt the question will be scored on."""
    if paraphrase:
        cases = [q for q in cases if q.rephrase]
    if not cases:
        return []
    on_prompt, top1 = accuracy_flags(model, tokenizer, cases, batch_size=batch_size)
    if paraphrase:
        on_rephrase, top1 = accuracy_flags(model, tokenizer, cases, on="rephrase", batch_size=batch_size)
        on_prompt = on_prompt & on_rephrase
    return [
        Question(**{**q.__dict__, "top1": bool(t)})
        for q, k, t in zip(cases, on_prompt.tolist(), top1.tolist(), strict=True)
        if k
    ]


def build_question_sets(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_topic: str,
    *,
    counterfact: str | Path | None = None,
    candidates_per_topic: int = 200,
    max_forget: int = 40,
    retain_questions: int = 300,
    min_forget: int = 20,
    corpus_cases: int = 400,
    batch_size: int = 32,
) -> QuestionSets:
    """Forget: up to ``max_forget`` questions of ``forget_topic`` the model answers on both the rewrite prompt and
    the paraphrase (those answered top-1 on the paraphrase first). Retain: exactly ``retain_questions`` questions
    the model answers on the rewrite prompt, spread evenly over the other topics.

    Each retain topic is scored in batches, in file order, only until it holds its share (a topic that runs out,
    or reaches ``candidates_per_topic`` scored cases, leaves its shortfall to the others), so the cost follows
    the set sizes, not the file.
    """
    cases = read_counterfact(counterfact)
    by_topic: dict[str, list[Question]] = {}
    for q in cases:
        by_topic.setdefault(q.topic, []).append(q)
    if forget_topic not in by_topic:
        raise FasteditError(f"unknown forget topic {forget_topic!r}; topics: {', '.join(sorted(by_topic))}")
    topics: dict[str, dict[str, int]] = {}

    cand = by_topic[forget_topic][:candidates_per_topic]
    known = _known(model, tokenizer, cand, paraphrase=True, batch_size=batch_size)
    known.sort(key=lambda q: not q.top1)  # answered first on the paraphrase, then the rest, in file order
    forget = known[:max_forget]
    topics[forget_topic] = {
        "cases": len(by_topic[forget_topic]),
        "scored": len(cand),
        "known": len(known),
        "known_top1": sum(q.top1 for q in known),
        "used": len(forget),
    }
    if len(forget) < min_forget:
        raise FasteditError(
            f"forget topic {forget_topic!r} has only {len(forget)} known questions (answered on prompt and "
            f"paraphrase, of {len(cand)} scored); need at least {min_forget}: pick another topic or raise --candidates"
        )

    others = sorted(t for t in by_topic if t != forget_topic)
    kept: dict[str, list[Question]] = {t: [] for t in others}
    scored = dict.fromkeys(others, 0)

    def fill(topic: str, want: int) -> None:
        cap = min(candidates_per_topic, len(by_topic[topic]))
        while len(kept[topic]) < want and scored[topic] < cap:
            # about twice the shortfall (most topics answer half or more of their cases), at most two batches
            size = min(2 * batch_size, max(8, 2 * (want - len(kept[topic]))))
            chunk = by_topic[topic][scored[topic] : min(cap, scored[topic] + size)]
            scored[topic] += len(chunk)
            kept[topic] += _known(model, tokenizer, chunk, paraphrase=False, batch_size=batch_size)

    share = math.ceil(retain_questions / max(len(others), 1))
    for t in others:
        fill(t, share)
    while sum(len(v) for v in kept.values()) < retain_questions:
        open_ = [t for t in others if scored[t] < min(candidates_per_topic, len(by_topic[t]))]
        if not open_:
            break
        short = retain_questions - sum(len(v) for v in kept.values())
        for t in open_:
            fill(t, len(kept[t]) + math.ceil(short / len(open_)))
    # Round-robin over the topics so each gives an equal share as far as it can.
    retain: list[Question] = []
    for i in range(max((len(v) for v in kept.values()), default=0)):
        retain += [kept[t][i] for t in others if i < len(kept[t])]
    retain = retain[:retain_questions]
    if len(retain) < retain_questions:
        raise FasteditError(
            f"only {len(retain)} known retain questions outside {forget_topic!r} (of {sum(scored.values())} scored); "
            f"need {retain_questions}: raise --candidates or lower --retain-questions"
        )
    used = {t: sum(q.topic == t for q in retain) for t in others}
    for t in others:
        topics[t] = {
            "cases": len(by_topic[t]),
            "scored": scored[t],
            "known": len(kept[t]),
            "known_top1": sum(q.top1 for q in kept[t]),
            "used": used[t],
        }
    for t, v in topics.items():
        log.info("topic %s: %s", t, v)
    corpus = topic_texts(by_topic[forget_topic][:corpus_cases])
    return QuestionSets(forget, retain, topics, corpus)


# ---- WMDP / MMLU four-letter multiple choice -------------------------------------------------------------

LETTERS = ("A", "B", "C", "D")


def read_multiple_choice(path: str | Path) -> list[dict[str, Any]]:
    """Rows {question, choices[4], answer: 0-3} from a local .jsonl / .json / .parquet file (WMDP/MMLU layout)."""
    path = Path(path)
    if not path.exists():
        raise FasteditError(f"multiple-choice file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(path.read_text())
    else:
        raise FasteditError(f"{path}: unsupported multiple-choice file type; use .jsonl, .json or .parquet")
    out = []
    for i, r in enumerate(rows):
        choices, answer = r.get("choices"), r.get("answer")
        if isinstance(answer, str) and answer.strip().upper() in LETTERS:
            answer = LETTERS.index(answer.strip().upper())
        if not isinstance(r.get("question"), str) or not isinstance(choices, list) or len(choices) != 4:
            raise FasteditError(f"{path}: row {i} needs 'question' and four 'choices'")
        if not isinstance(answer, int) or not 0 <= answer < 4:
            raise FasteditError(f"{path}: row {i} has answer {answer!r}; expected 0-3 or A-D")
        out.append({"question": r["question"], "choices": [str(c) for c in choices], "answer": answer})
    return out


def mc_prompt(question: str, choices: Sequence[str], subject: str = "") -> str:
    """The WMDP/MMLU zero-shot prompt; the answer is read from the next-token logits of " A".." D"."""
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
    body = "\n".join(f"{letter}. {c}" for letter, c in zip(LETTERS, choices, strict=True))
    return f"{head}{question.strip()}\n{body}\nAnswer:"


@torch.no_grad()
def mc_accuracy(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], *, subject: str = "", batch_size: int = 8
) -> dict[str, Any]:
    """Four-letter accuracy: argmax over the logits of the letter tokens at the end of the prompt."""
    letter_ids = [tokenizer(" " + c, add_special_tokens=False)["input_ids"][-1] for c in LETTERS]
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = []
    last = last_logits_only(model)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        enc = [tokenizer(mc_prompt(r["question"], r["choices"], subject))["input_ids"] for r in batch]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), **last).logits
        pred = logits[:, -1, letter_ids].argmax(-1)
        correct += [int(p) == r["answer"] for p, r in zip(pred.tolist(), batch, strict=True)]
    return {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct), "correct": correct}
