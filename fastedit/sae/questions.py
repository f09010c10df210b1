"""Offline question sets: CounterFact facts the model demonstrably knows, grouped into topics; WMDP/MMLU files.

Topics come from the relation wording of each CounterFact prompt (the flat layout carries no relation id): the
template is the prompt with the subject replaced by ``{}``, and the first matching keyword group wins, in the
order of ``TOPIC_RULES`` (e.g. "The language of {} is" -> languages, "{} plays as" -> sports_music). A question
is *known* when the model gives the true answer a lower mean per-token NLL than the counterfactual target
(the two-way test of DESIGN.md); ``top1`` records whether the true answer's first token is also the model's
first choice. Accuracy under an intervention is the share of questions still answered truly by that test.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastedit.errors import FasteditError

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
    prompt: str  # complete prompt (subject filled in)
    subject: str
    true: str  # ground truth, no leading space
    new: str  # the counterfactual target
    rephrase: str = ""
    top1: bool = False


def default_counterfact() -> Path:
    """The flat CounterFact file: the ``counterfact`` data set (a one-line error says how to add it)."""
    from fastedit.data import dataset_path

    return dataset_path("counterfact")


def read_counterfact(path: str | Path | None = None) -> list[Question]:
    """All cases of a flat CounterFact file as (unscored) questions with their topic."""
    from fastedit.data import resolve_data

    path = resolve_data(path) if path is not None else default_counterfact()
    if not path.exists():
        raise FasteditError(
            f"CounterFact file {str(path)!r} does not exist; pass --counterfact FILE or a data-set name (counterfact)"
        )
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FasteditError(f"{path}: not valid JSON ({exc})") from None
    out = []
    for i, r in enumerate(records):
        try:
            prompt, subject = r["prompt"], r["subject"]
            out.append(
                Question(
                    case_id=str(r.get("case_id", i)),
                    topic=topic_of(prompt, subject),
                    prompt=prompt if "{}" not in prompt else prompt.replace("{}", subject, 1),
                    subject=subject,
                    true=str(r["ground_truth"]).strip(),
                    new=str(r["target_new"]).strip(),
                    rephrase=str(r.get("rephrase_prompt", "")),
                )
            )
        except (KeyError, TypeError):
            raise FasteditError(
                f"{path}: record {i} is not in the flat CounterFact layout "
                "(needs prompt, subject, target_new, ground_truth)"
            ) from None
    return out


def topic_texts(questions: Sequence[Question]) -> list[str]:
    """The forget corpus: each fact stated as text (prompt + true answer, and its rephrasing)."""
    texts = []
    for q in questions:
        texts.append(f"{q.prompt} {q.true}.")
        if q.rephrase:
            texts.append(f"{q.rephrase} {q.true}.")
    return texts


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(1) - 1).clamp_min(0)


@torch.no_grad()
def target_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 16,
    set_mask: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token NLL of " " + target after each prompt (teacher forced), and the first-target-token rank.

    Rows are left-padded so every target ends the sequence and only the last few positions need logits
    (``logits_to_keep``): with a 262k vocabulary the LM head otherwise dominates the cost.
    ``set_mask`` receives the (batch, seq) mask of real non-BOS tokens before each forward (for hooks).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bos = tokenizer.bos_token_id
    nll = torch.zeros(len(prompts))
    rank = torch.zeros(len(prompts), dtype=torch.long)
    for start in range(0, len(prompts), batch_size):
        rows, tlens = [], []
        for p, t in zip(prompts[start : start + batch_size], targets[start : start + batch_size], strict=True):
            p_ids = tokenizer(p)["input_ids"]
            t_ids = tokenizer(" " + t, add_special_tokens=False)["input_ids"]
            rows.append(p_ids + t_ids)
            tlens.append(len(t_ids))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        if set_mask is not None:
            set_mask(mask.bool() & (ids != bos if bos is not None else True))
        keep = max(tlens) + 1
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), logits_to_keep=keep
        ).logits.float()
        logp = logits.log_softmax(-1)  # (b, keep, V): position j predicts token width − keep + j + 1
        for i, tl in enumerate(tlens):
            tgt = ids[i, width - tl :]
            pred = logp[i, keep - tl - 1 : keep - 1]
            nll[start + i] = -pred.gather(1, tgt[:, None]).mean()
            rank[start + i] = int((pred[0] > pred[0, tgt[0]]).sum())
    return nll, rank


def accuracy_flags(
    model: torch.nn.Module, tokenizer: Any, questions: Sequence[Question], **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) bool: true answer beats the counterfactual; (n,) bool: true answer's first token ranked first."""
    if not questions:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)
    prompts = [q.prompt for q in questions]
    n_true, r_true = target_nll(model, tokenizer, prompts, [q.true for q in questions], **kw)
    n_new, _ = target_nll(model, tokenizer, prompts, [q.new for q in questions], **kw)
    return n_true < n_new, r_true == 0


@dataclass
class QuestionSets:
    forget: list[Question]
    retain: list[Question]
    topics: dict[str, dict[str, int]]  # topic -> {"candidates", "known", "known_top1", "used"}
    forget_corpus: list[str]


def build_question_sets(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_topic: str,
    *,
    counterfact: str | Path | None = None,
    candidates_per_topic: int = 80,
    max_forget: int = 40,
    retain_per_topic: int = 10,
    min_forget: int = 20,
    corpus_cases: int = 400,
) -> QuestionSets:
    """Known questions of ``forget_topic`` (forget) and of every other topic (retain), scored on ``model``."""
    cases = read_counterfact(counterfact)
    by_topic: dict[str, list[Question]] = {}
    for q in cases:
        by_topic.setdefault(q.topic, []).append(q)
    if forget_topic not in by_topic:
        raise FasteditError(f"unknown forget topic {forget_topic!r}; topics: {', '.join(sorted(by_topic))}")
    forget: list[Question] = []
    retain: list[Question] = []
    topics: dict[str, dict[str, int]] = {}
    for topic in sorted(by_topic):
        cand = by_topic[topic][:candidates_per_topic]
        known, top1 = accuracy_flags(model, tokenizer, cand)
        kept = [
            Question(**{**q.__dict__, "top1": bool(t)})
            for q, k, t in zip(cand, known.tolist(), top1.tolist(), strict=True)
            if k
        ]
        # Prefer questions also answered first (top-1), then the rest, in file order.
        kept.sort(key=lambda q: not q.top1)
        used = kept[:max_forget] if topic == forget_topic else kept[:retain_per_topic]
        (forget if topic == forget_topic else retain).extend(used)
        topics[topic] = {
            "cases": len(by_topic[topic]),
            "candidates": len(cand),
            "known": len(kept),
            "known_top1": sum(q.top1 for q in kept),
            "used": len(used),
        }
        log.info("topic %s: %s", topic, topics[topic])
    if len(forget) < min_forget:
        counts = ", ".join(f"{t}: {v['known']}" for t, v in topics.items())
        raise FasteditError(
            f"forget topic {forget_topic!r} has only {len(forget)} known questions (of "
            f"{topics[forget_topic]['candidates']} scored); need at least {min_forget}: pick another topic "
            f"({counts}) or raise --candidates"
        )
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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        enc = [tokenizer(mc_prompt(r["question"], r["choices"], subject))["input_ids"] for r in batch]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), logits_to_keep=1).logits
        pred = logits[:, -1, letter_ids].argmax(-1)
        correct += [int(p) == r["answer"] for p, r in zip(pred.tolist(), batch, strict=True)]
    return {"accuracy": sum(correct) / max(len(correct), 1), "n": len(correct), "correct": correct}
