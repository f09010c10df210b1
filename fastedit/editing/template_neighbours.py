"""Template neighbours: each request's prompt template filled with other subjects (of the batch, or model-listed).

A MEMIT-family update is asked to change W k for the edited keys and to leave C0's keys alone, C0 coming from
generic text. Keys of one relation's prompts ("The currency of {}") share a component that generic text hardly
covers, so an edit of that relation also moves the same prompt about other subjects — most visibly when several
edits of one relation share a new object (four currencies to "dollar" turn the unedited countries' currency too).
Filling each template with other subjects of the batch gives keys K_t of exactly that kind; the rules preserve
them with weight w (C = λC0 + εI + w·K_t K_tᵀ, `LayerProblem.preserved`).

K_t is read at the subject's last token of the bare prompts, on the model before this batch's edit (as C0 is),
all edited layers in one forward. A pair (template, subject) that is itself edited in the batch is never a
neighbour. The choice of subjects is seeded (the batch's draw, and the model's lists), so a run is reproducible.

The limit of the batch's subjects: a key sees only the text before the subject's last token, so for a template that
starts with its subject ("{} is a company based in") the neighbour key is that subject's bare key, and the batch
edits that subject under its own prompt; such a neighbour holds back another request's edit (PS falls with the
weight, README). With ``template_neighbours_source = "model"`` the other subjects are instead the names the model
lists as of each subject's kind (`siblings.py`; never a subject of the batch), the kind of subject whose keys an
edit of a well-known fact disturbs.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fastedit.arch import ArchSpec
from fastedit.editing.hparams import NEIGHBOUR_SOURCES
from fastedit.editing.keys import read_at_subject
from fastedit.editing.siblings import list_siblings
from fastedit.errors import ConfigError
from fastedit.requests import EditRequest

SEED = 0


def template_neighbour_requests(
    requests: Sequence[EditRequest], per_request: int, siblings: Mapping[str, Sequence[str]] | None = None
) -> list[EditRequest]:
    """Up to ``per_request`` prompts per request: its template with other subjects, never a (template, subject)
    pair the batch edits, each pair at most once. The other subjects are ``siblings[request.subject]`` when given
    (names the model lists as of the subject's kind), else a seeded draw from the batch's subjects."""
    rng = random.Random(SEED)
    subjects = list(dict.fromkeys(r.subject for r in requests))
    taken = {(r.prompt, r.subject) for r in requests}
    out: list[EditRequest] = []
    for req in requests:
        if siblings is not None:
            chosen = [s for s in siblings.get(req.subject, ()) if (req.prompt, s) not in taken][:per_request]
        else:
            others = [s for s in subjects if (req.prompt, s) not in taken]
            chosen = rng.sample(others, min(per_request, len(others)))
        for subject in chosen:
            taken.add((req.prompt, subject))
            case = f"{req.case_id}/neighbour"
            out.append(EditRequest(case_id=case, prompt=req.prompt, subject=subject, target_new=""))
    return out


def template_neighbour_keys(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: ArchSpec,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    per_request: int,
    source: str = "batch",
) -> dict[int, torch.Tensor]:
    """layer -> K_t (n_t, d_k): keys of the template-neighbour prompts at every layer, one forward for all.
    ``source``: "batch" fills templates with the batch's other subjects, "model" with the subjects' siblings
    (listed by the ranks of a process group together: every rank must call it)."""
    if source not in NEIGHBOUR_SOURCES:
        raise ConfigError(f"template neighbours: source {source!r} is not one of " + ", ".join(NEIGHBOUR_SOURCES))
    siblings = None
    if source == "model":
        subjects = [r.subject for r in requests]
        siblings = list_siblings(model, tokenizer, subjects, per_subject=per_request, across_ranks=True)
    neighbours = template_neighbour_requests(requests, per_request, siblings)
    if not neighbours:
        return {}
    names = {layer: spec.path("mlp_out", layer) for layer in layers}
    read = read_at_subject(
        model, tokenizer, spec, neighbours, ["{}"], stop_layer=max(layers), inputs_of=list(names.values())
    )
    return {layer: read[f"in:{name}"][:, 0] for layer, name in names.items()}
