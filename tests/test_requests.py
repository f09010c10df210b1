"""Request parsing: every layout (incl. the real shared files), autodetection, and every bad-record case."""

from __future__ import annotations

import json

import pytest

from fastedit.errors import RequestError
from fastedit.requests import EditRequest, as_requests, detect_layout, load_requests, parse_requests


def test_flat_counterfact_file(counterfact):
    parsed = load_requests(counterfact)
    assert parsed.layout == "flat"
    assert len(parsed.requests) == 10_000
    first = parsed.requests[0]
    assert first == EditRequest(
        case_id="0",
        prompt="The mother tongue of {} is",
        subject="Danielle Darrieux",
        target_new="English",
        target_true="French",
        paraphrases=("Where Danielle Darrieux is from, people speak the language of",),
        neighborhood_prompts=("Michel Rocard is a native speaker of",),
        neighborhood_answers=("French",),
    )
    assert first.rewrite_prompt() == "The mother tongue of Danielle Darrieux is"


def test_original_counterfact_sample(counterfact_original):
    parsed = load_requests(counterfact_original)
    assert parsed.layout == "original"
    assert len(parsed.requests) == 5
    first = parsed.requests[0]
    assert (first.prompt, first.target_new, first.target_true) == ("The mother tongue of {} is", "English", "French")
    assert len(first.paraphrases) == 2 and len(first.neighborhood_prompts) == 10
    assert first.neighborhood_answers == ()  # neighbours share target_true in this layout
    assert first.generation_prompts[0] == "Danielle Darrieux's mother tongue is"


def test_zsre_file_reports_every_bad_record_and_can_skip_them(zsre):
    with pytest.raises(RequestError) as info:
        load_requests(zsre)
    message = str(info.value)
    assert "23 of 1000" in message
    assert "record 88: alt 'Chicago Bears' equals a true answer" in message
    assert "record 534: alt is empty or whitespace" in message
    assert "record 866:" in message
    parsed = load_requests(zsre, skip_invalid=True, n=100)
    assert parsed.layout == "zsre" and len(parsed.requests) == 100 and len(parsed.skipped) == 23
    first = parsed.requests[0]
    assert first.prompt == "What is the product made by {}?"
    assert (first.subject, first.target_new, first.target_true) == ("UniFirst", "unmanned aircraft", "uniform")
    assert first.paraphrases == ("What will be the product of UniFirst?",)
    assert first.neighborhood_prompts == ("nq question: john goodman's character in the big lebowski?",)
    assert first.neighborhood_answers == ("Walter Sobchak",)
    assert parsed.requests[88].case_id == "89"  # ids are record indices; record 88 was skipped


def test_plain_layout_with_braces_or_subject_in_prompt(tmp_path):
    records = [
        {"prompt": "The capital of {} is", "subject": "Italy", "target_new": "Vienna"},
        {"prompt": "Tokyo is a city in", "subject": "Tokyo", "target_new": " Brazil ", "target_true": "Japan"},
        {
            "prompt": "{} plays",
            "subject": "Michael Jordan",
            "target_new": "tennis",
            "paraphrases": ["The sport {} plays is"],
            "case_id": 7,
        },
    ]
    parsed = parse_requests(records)
    assert parsed.layout == "plain"
    a, b, c = parsed.requests
    assert (a.case_id, a.prompt, a.target_true) == ("0", "The capital of {} is", None)
    assert (b.prompt, b.target_new) == ("{} is a city in", "Brazil")  # subject located, target stripped
    assert c.case_id == "7" and c.paraphrases == ("The sport Michael Jordan plays is",)
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert load_requests(path, n=2).requests == [a, b]


def test_project_request_file_parses():
    parsed = load_requests("data/known-facts.json")
    assert parsed.layout == "plain" and 5 <= len(parsed.requests) <= 10
    assert all(r.target_true and r.paraphrases and r.neighborhood_answers for r in parsed.requests)


@pytest.mark.parametrize("name", ["well-known-facts", "well-known-facts-tune", "well-known-facts-holdout"])
def test_well_known_facts_can_score_every_neighbour(name):
    """Each case has paraphrases and answered neighbours; no neighbour is rewritten by the same set (NS could not
    keep it) and none answers the case's new object (new and true would tie, and a tie never counts as kept)."""
    requests = load_requests(f"data/{name}.json").requests
    edited = {r.rewrite_prompt() for r in requests}
    for r in requests:
        assert r.target_true and r.target_true != r.target_new and len(r.paraphrases) >= 2, r.case_id
        assert len(r.neighborhood_answers) == len(r.neighborhood_prompts) >= 2, r.case_id
        assert not edited & set(r.neighborhood_prompts), r.case_id
        assert r.target_new not in r.neighborhood_answers, r.case_id


def test_fact_sets_share_no_prompt():
    """The facts hparams are tuned on, the facts they are reported on and the held-out facts no choice looked at are
    separate: no rewrite or neighbour prompt of one set appears in another, and the held-out set edits no subject of
    the other two."""
    names = ["well-known-facts-tune", "well-known-facts", "well-known-facts-holdout"]
    sets = {name: load_requests(f"data/{name}.json").requests for name in names}
    prompts = {
        name: {r.rewrite_prompt() for r in reqs} | {p for r in reqs for p in r.neighborhood_prompts}
        for name, reqs in sets.items()
    }
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    earlier = {r.subject for name in names[:2] for r in sets[name]}
    assert not earlier & {r.subject for r in sets["well-known-facts-holdout"]}


@pytest.mark.parametrize(
    ("record", "layout"),
    [
        ({"requested_rewrite": {}}, "original"),
        ({"src": "q", "alt": "a", "subject": "s"}, "zsre"),
        ({"prompt": "p", "subject": "s", "target_new": "t", "ground_truth": "g"}, "flat"),
        ({"prompt": "p", "subject": "s", "target_new": "t"}, "plain"),
    ],
)
def test_detect_layout(record, layout):
    assert detect_layout(record) == layout


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(RequestError, match="cannot tell the request layout"):
        parse_requests([{"question": "x"}])


def _flat(i, **changes):
    rec = {
        "case_id": i,
        "prompt": "The capital of Italy is",
        "subject": "Italy",
        "target_new": "Vienna",
        "ground_truth": "Rome",
        "rephrase_prompt": "Italy's capital is",
        "locality_prompt": "The capital of Spain is",
        "locality_ground_truth": "Madrid",
    }
    rec.update(changes)
    return rec


def test_every_bad_flat_record_is_reported_by_index():
    records = [
        _flat(0),
        _flat(1, subject="France"),  # subject not in prompt
        _flat(2, target_new=""),  # empty target
        _flat(3, target_new="   "),  # whitespace target
        _flat(4, target_new="Rome"),  # equals the true answer
        _flat(5),
        _flat(5),  # duplicate case id
    ]
    with pytest.raises(RequestError) as info:
        parse_requests(records, source="cf.json")
    lines = str(info.value).splitlines()
    assert "cf.json: 5 of 7 flat-layout record(s) are invalid" in lines[0]
    assert lines[1:] == [
        "  record 1: subject 'France' not found in prompt 'The capital of Italy is'",
        "  record 2: target_new is empty or whitespace",
        "  record 3: target_new is empty or whitespace",
        "  record 4: target_new 'Rome' equals the true answer; nothing to edit",
        "  record 6: duplicate case_id '5' (first at record 5)",
    ]
    kept = parse_requests(records, skip_invalid=True)
    assert [r.case_id for r in kept.requests] == ["0", "5"]
    assert [i for i, _ in kept.skipped] == [1, 2, 3, 4, 6]


def test_original_layout_prompt_without_braces(counterfact_original):
    rec = json.loads(counterfact_original.read_text())[0]
    rec["requested_rewrite"]["prompt"] = "The mother tongue of Danielle Darrieux is"
    with pytest.raises(RequestError, match=r"record 0: prompt .* has no \{\} where the subject goes"):
        parse_requests([rec])


def test_mixed_layouts_and_non_records_are_reported():
    with pytest.raises(RequestError) as info:
        parse_requests([_flat(0), {"src": "What is x?", "subject": "x", "alt": "y", "answers": ["z"]}, "oops"])
    assert "record 1: record is in the zsre layout, the file is flat" in str(info.value)
    assert "record 2: expected a mapping, got str" in str(info.value)


def test_as_requests_rejects_duplicate_ids():
    r = EditRequest("1", "{} is", "x", "y")
    assert as_requests(r) == [r]
    with pytest.raises(RequestError, match="duplicate case_id"):
        as_requests([r, r])


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(RequestError, match="does not exist"):
        load_requests(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(RequestError, match="not valid JSON"):
        load_requests(bad)
