"""One typed edit request, whatever layout it came from (original CounterFact, flat CounterFact, zsRE, plain)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastedit.editing.easyedit import locality_pairs
from fastedit.errors import RequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditRequest:
    """Rewrite ``subject``'s fact in ``prompt`` to ``target_new``.

    ``prompt`` is a template with ``{}`` where the subject goes. Targets are stored without a leading space;
    scoring and v* optimisation use ``" " + target``. Neighbourhood prompts are complete prompts about other
    subjects whose true answers (``neighborhood_answers``, one per prompt, or ``target_true`` when empty) must not
    move towards ``target_new``.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_answers: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    def rewrite_prompt(self) -> str:
        """The prompt with the subject filled in (``str.replace``: other braces in the text are left alone)."""
        return self.prompt.replace("{}", self.subject, 1)


# ---- parsing ---------------------------------------------------------------------------------------------

LAYOUTS = ("original", "flat", "zsre", "plain")

# Keys that identify a layout (checked in this order: the flat layout also has prompt/subject/target_new).
_SIGNATURES: tuple[tuple[str, frozenset[str]], ...] = (
    ("original", frozenset({"requested_rewrite"})),
    ("zsre", frozenset({"src", "alt"})),
    ("flat", frozenset({"ground_truth"})),
    ("flat", frozenset({"rephrase_prompt"})),
    ("flat", frozenset({"locality_prompt"})),
    ("flat", frozenset({"prompt", "subject", "target_new", "locality"})),  # EasyEdit's request dicts
    ("plain", frozenset({"prompt", "subject", "target_new"})),
)


class _Bad(Exception):
    """One record's problem; collected per index and reported together."""


def detect_layout(record: Any) -> str:
    """The layout of one record ("original", "flat", "zsre" or "plain"), from its keys."""
    if isinstance(record, dict):
        for layout, keys in _SIGNATURES:
            if keys <= record.keys():
                return layout
    found = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise RequestError(
        "cannot tell the request layout: expected records with requested_rewrite (original CounterFact), "
        "prompt/subject/target_new/ground_truth (flat CounterFact), src/subject/alt/answers (zsRE) or "
        f"prompt/subject/target_new (plain); the first record has keys {found}"
    )


def _text(value: Any, what: str) -> str:
    """A target or prompt string: CounterFact wraps targets as {"str": ..., "id": ...}."""
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    if not isinstance(value, str):
        raise _Bad(f"{what} must be a string, got {type(value).__name__}")
    return value


def _target(value: Any, what: str) -> str:
    text = _text(value, what).strip()  # stored without the leading space that scoring adds back
    if not text:
        raise _Bad(f"{what} is empty or whitespace")
    return text


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise _Bad(f"{what} must be a string or a list of strings, got {type(value).__name__}")
    return tuple(_text(v, f"{what}[{i}]") for i, v in enumerate(value))


def _template(prompt: str, subject: str, *, require_braces: bool) -> str:
    """The prompt as a template with ``{}`` for the subject's first occurrence."""
    if "{}" in prompt:
        return prompt
    if require_braces:
        raise _Bad(f"prompt {prompt!r} has no {{}} where the subject goes (the original layout requires one)")
    if subject not in prompt:
        raise _Bad(f"subject {subject!r} not found in prompt {prompt!r}")
    return prompt.replace(subject, "{}", 1)


def _subject(value: Any) -> str:
    subject = _text(value, "subject")
    if not subject.strip():
        raise _Bad("subject is empty or whitespace")
    return subject


def _from_original(rec: dict[str, Any], index: int) -> EditRequest:
    rw = rec["requested_rewrite"]
    if not isinstance(rw, dict):
        raise _Bad("requested_rewrite must be a mapping with prompt, subject, target_new, target_true")
    missing = [k for k in ("prompt", "subject", "target_new") if k not in rw]
    if missing:
        raise _Bad(f"requested_rewrite lacks {', '.join(missing)}")
    subject = _subject(rw["subject"])
    return EditRequest(
        case_id=str(rec.get("case_id", index)),
        prompt=_template(_text(rw["prompt"], "requested_rewrite.prompt"), subject, require_braces=True),
        subject=subject,
        target_new=_target(rw["target_new"], "target_new"),
        target_true=_target(rw["target_true"], "target_true") if rw.get("target_true") is not None else None,
        paraphrases=_strings(rec.get("paraphrase_prompts"), "paraphrase_prompts"),
        neighborhood_prompts=_strings(rec.get("neighborhood_prompts"), "neighborhood_prompts"),
        generation_prompts=_strings(rec.get("generation_prompts"), "generation_prompts"),
    )


def _from_flat(rec: dict[str, Any], index: int) -> EditRequest:
    subject = _subject(rec.get("subject"))
    neighborhood = _strings(rec.get("locality_prompt"), "locality_prompt")
    answers = _strings(rec.get("locality_ground_truth"), "locality_ground_truth")
    if len(answers) != len(neighborhood):
        raise _Bad(f"{len(neighborhood)} locality_prompt(s) but {len(answers)} locality_ground_truth answer(s)")
    try:  # EasyEdit's per-request {"neighborhood": {"prompt": ..., "ground_truth": ...}, ...}
        more_prompts, more_answers = locality_pairs(rec.get("locality"))
    except RequestError as exc:
        raise _Bad(str(exc)) from None
    neighborhood, answers = neighborhood + tuple(more_prompts), answers + tuple(more_answers)
    truth = rec.get("ground_truth")
    if isinstance(truth, (list, tuple)):  # EasyEdit allows a list of true answers: the first is scored
        truth = truth[0] if truth else None
    return EditRequest(
        case_id=str(rec.get("case_id", index)),
        prompt=_template(_text(rec.get("prompt"), "prompt"), subject, require_braces=False),
        subject=subject,
        target_new=_target(rec.get("target_new"), "target_new"),
        target_true=_target(truth, "ground_truth") if truth is not None else None,
        paraphrases=_strings(rec.get("rephrase_prompt"), "rephrase_prompt"),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=tuple(a.strip() for a in answers),
    )


def _from_zsre(rec: dict[str, Any], index: int) -> EditRequest:
    subject = _subject(rec.get("subject"))
    answers = tuple(a.strip() for a in _strings(rec.get("answers"), "answers"))
    target_new = _target(rec.get("alt"), "alt")
    if target_new in answers:
        raise _Bad(f"alt {target_new!r} equals a true answer {list(answers)}; nothing to edit")
    loc = _strings(rec.get("loc"), "loc")
    loc_ans = _strings(rec.get("loc_ans"), "loc_ans")
    if len(loc) != len(loc_ans):
        raise _Bad(f"{len(loc)} loc prompt(s) but {len(loc_ans)} loc_ans answer(s)")
    return EditRequest(
        case_id=str(rec.get("case_id", index)),
        prompt=_template(_text(rec.get("src"), "src"), subject, require_braces=False),
        subject=subject,
        target_new=target_new,
        target_true=answers[0] if answers else None,
        paraphrases=_strings(rec.get("rephrase"), "rephrase"),
        # zsRE's loc is an NQ question without its question mark ("nq question: who plays ..."); the reference
        # evaluation (ROME/MEMIT) appends "?" before scoring loc_ans, and so do we.
        neighborhood_prompts=tuple(q if q.rstrip().endswith("?") else q + "?" for q in loc),
        neighborhood_answers=tuple(a.strip() for a in loc_ans),
    )


def _from_plain(rec: dict[str, Any], index: int) -> EditRequest:
    allowed = {f.name for f in dataclasses.fields(EditRequest)}
    unknown = sorted(set(rec) - allowed)
    if unknown:
        raise _Bad(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    subject = _subject(rec.get("subject"))
    answers = _strings(rec.get("neighborhood_answers"), "neighborhood_answers")
    neighborhood = _strings(rec.get("neighborhood_prompts"), "neighborhood_prompts")
    if answers and len(answers) != len(neighborhood):
        raise _Bad(f"{len(neighborhood)} neighborhood_prompts but {len(answers)} neighborhood_answers")
    return EditRequest(
        case_id=str(rec.get("case_id", index)),
        prompt=_template(_text(rec.get("prompt"), "prompt"), subject, require_braces=False),
        subject=subject,
        target_new=_target(rec.get("target_new"), "target_new"),
        target_true=_target(rec["target_true"], "target_true") if rec.get("target_true") is not None else None,
        # Paraphrase and generation prompts may be templates too: "{}" is filled with the subject.
        paraphrases=tuple(p.replace("{}", subject) for p in _strings(rec.get("paraphrases"), "paraphrases")),
        neighborhood_prompts=neighborhood,
        neighborhood_answers=tuple(a.strip() for a in answers),
        generation_prompts=tuple(
            p.replace("{}", subject) for p in _strings(rec.get("generation_prompts"), "generation_prompts")
        ),
    )


_PARSERS = {"original": _from_original, "flat": _from_flat, "zsre": _from_zsre, "plain": _from_plain}


def _check(request: EditRequest) -> None:
    """Checks shared by every layout, on the parsed request."""
    if request.target_true is not None and request.target_new == request.target_true:
        raise _Bad(f"target_new {request.target_new!r} equals the true answer; nothing to edit")
    if request.prompt.count("{}") != 1:
        raise _Bad(f"prompt {request.prompt!r} must contain exactly one {{}} for the subject")


@dataclass(frozen=True)
class ParsedRequests:
    """The valid requests, the layout they came in, and the records dropped (index, reason) when skipping."""

    requests: list[EditRequest]
    layout: str
    skipped: list[tuple[int, str]]


def parse_requests(
    records: Sequence[Any], *, layout: str | None = None, source: str = "requests", skip_invalid: bool = False
) -> ParsedRequests:
    """Parse records of one layout (autodetected from the first record unless given) into `EditRequest`s.

    Every record is validated; all problems are reported together in one `RequestError`, each with its
    index, unless ``skip_invalid`` (then bad records are dropped and listed in ``skipped``).
    """
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, (list, tuple)):
        raise RequestError(f"{source}: expected a list of request records, got {type(records).__name__}")
    if not records:
        raise RequestError(f"{source}: no request records")
    if layout is None:
        layout = detect_layout(records[0])
    elif layout not in _PARSERS:
        raise RequestError(f"unknown request layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    parse = _PARSERS[layout]
    requests: list[EditRequest] = []
    bad: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for index, rec in enumerate(records):
        try:
            if not isinstance(rec, dict):
                raise _Bad(f"expected a mapping, got {type(rec).__name__}")
            if detect_layout(rec) != layout:
                raise _Bad(f"record is in the {detect_layout(rec)} layout, the file is {layout}")
            request = parse(rec, index)
            _check(request)
            if request.case_id in seen:
                raise _Bad(f"duplicate case_id {request.case_id!r} (first at record {seen[request.case_id]})")
        except _Bad as exc:
            bad.append((index, str(exc)))
            continue
        except RequestError as exc:  # detect_layout on a record of no known layout
            bad.append((index, f"no known layout (keys {sorted(rec)})" if isinstance(rec, dict) else str(exc)))
            continue
        except KeyError as exc:
            bad.append((index, f"missing key {exc}"))
            continue
        seen[request.case_id] = index
        requests.append(request)
    if bad and not skip_invalid:
        lines = "\n".join(f"  record {i}: {why}" for i, why in bad)
        raise RequestError(
            f"{source}: {len(bad)} of {len(records)} {layout}-layout record(s) are invalid (fix them, or skip "
            f"them with --skip-invalid / skip_invalid=True):\n{lines}"
        )
    if bad:
        log.warning("%s: skipped %d invalid record(s): %s", source, len(bad), ", ".join(str(i) for i, _ in bad))
    if not requests:
        raise RequestError(f"{source}: no valid request left")
    return ParsedRequests(requests, layout, bad)


def load_requests(
    path: str | Path, *, layout: str | None = None, n: int | None = None, skip_invalid: bool = False
) -> ParsedRequests:
    """Read a .json (list of records) or .jsonl file, or a data set by name (``counterfact``, ``zsre``, see
    `fastedit.data`), and parse it; ``n`` keeps the first n valid requests."""
    from fastedit.data import resolve_data

    path = resolve_data(path)
    if not path.is_file():
        raise RequestError(f"request file {str(path)!r} does not exist; pass a CounterFact, zsRE or plain JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            f"{path} is not UTF-8 text (invalid byte at offset {exc.start}); save the request file as UTF-8 JSON"
        ) from None
    try:
        if path.suffix == ".jsonl":
            records: Any = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"{path}: not valid JSON ({exc})") from None
    parsed = parse_requests(records, layout=layout, source=str(path), skip_invalid=skip_invalid)
    if n is not None:
        if n < 1:
            raise RequestError(f"n must be at least 1, got {n}")
        parsed = ParsedRequests(parsed.requests[:n], parsed.layout, parsed.skipped)
    return parsed


# Tokens a prompt may need beyond its own: v*'s context prefixes (context_length ≤ 10 by default) and BOS.
CONTEXT_MARGIN = 16
CHARS_PER_TOKEN_BOUND = 64  # no tokenizer packs more characters into one token in practice


def _texts(request: EditRequest) -> list[tuple[str, str]]:
    """(what, text) of every sequence the editors and the evaluation feed the model for ``request``."""
    new = " " + request.target_new
    texts = [("prompt", request.rewrite_prompt() + new)]
    texts += [(f"paraphrase {i}", p + new) for i, p in enumerate(request.paraphrases)]
    texts += [(f"neighbourhood prompt {i}", p + " " + (request.target_true or "")) for i, p in
              enumerate(request.neighborhood_prompts)]  # fmt: skip
    texts += [(f"generation prompt {i}", p) for i, p in enumerate(request.generation_prompts)]
    return texts


def check_request_lengths(requests: Sequence[EditRequest], tokenizer: Any, max_positions: int | None) -> None:
    """Every text of every request fits the model's positions (with room for v*'s context prefix).

    Called once the tokenizer is known and before any v* work: a 10 MB prompt otherwise asks for logits of
    (tokens × vocabulary) floats minutes later.
    """
    if max_positions is None:
        return
    limit = max(1, max_positions - CONTEXT_MARGIN)
    for request in requests:
        for what, text in _texts(request):
            if len(text) > CHARS_PER_TOKEN_BOUND * max_positions:
                size = f"{len(text):,} characters"
            else:
                n = len(tokenizer(text, add_special_tokens=False).input_ids)
                if n <= limit:
                    continue
                size = f"{n:,} tokens"
            raise RequestError(
                f"request {request.case_id!r}: its {what} is {size} long, but the model takes at most "
                f"{max_positions} positions ({limit} after v*'s context prefix); shorten it or drop the request"
            )


def as_requests(requests: Any) -> list[EditRequest]:
    """Accept a path, one record/request, or a list of `EditRequest`s and/or records of one layout."""
    if isinstance(requests, (str, Path)):
        return load_requests(requests).requests
    if isinstance(requests, (EditRequest, dict)):
        requests = [requests]
    requests = list(requests)
    if requests and all(isinstance(r, EditRequest) for r in requests):
        ids = [r.case_id for r in requests]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise RequestError(f"duplicate case_id(s) {', '.join(dupes)} among the requests; give each a unique id")
        return requests
    if any(isinstance(r, EditRequest) for r in requests):
        raise RequestError("pass either EditRequest objects or raw records, not a mix")
    return parse_requests(requests).requests
