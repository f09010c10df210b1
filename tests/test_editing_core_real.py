"""The editing core on the real models: edits make the new targets win; the fast v* replay matches the model."""

from __future__ import annotations

import json

import pytest
import torch

from fastedit.arch import arch_for, restored_after
from fastedit.editing.engine import apply_edit
from fastedit.editing.hparams import load_hparams
from fastedit.requests import EditRequest

pytestmark = pytest.mark.real


def _requests(n: int, counterfact) -> list[EditRequest]:
    records = json.loads(counterfact.read_text())[:n]
    return [
        EditRequest(str(r["case_id"]), r["prompt"].replace(r["subject"], "{}", 1), r["subject"], r["target_new"],
                    r["ground_truth"])
        for r in records
    ]  # fmt: skip


@torch.no_grad()
def _nll(model, tok, prompt: str, target: str) -> float:
    p = tok(prompt).input_ids
    t = tok(" " + target, add_special_tokens=False).input_ids
    logp = torch.log_softmax(model(input_ids=torch.tensor([p + t[:-1]])).logits[0], -1)
    return -sum(logp[len(p) - 1 + j, x].item() for j, x in enumerate(t)) / len(t)


@pytest.mark.parametrize(("method", "n"), [("memit", 2), ("rome", 1)])
def test_edit_makes_the_new_target_win(smollm2, method, n, wikitext, counterfact):
    from fastedit.stats import ensure_stats

    model, tok = smollm2
    hp = load_hparams(method, model).replace(v_mode="fast")
    stats = ensure_stats(model, tok, list(hp.layers), dm=10, corpus=str(wikitext), progress=False)
    requests = _requests(n, counterfact)
    spec = arch_for(model)
    with restored_after(model, spec, hp.layers):
        before = [_nll(model, tok, r.rewrite_prompt(), r.target_new) for r in requests]
        apply_edit(model, tok, requests, method=method, hparams=hp, stats={k: v.mean for k, v in stats.items()})
        for req, nll_before in zip(requests, before, strict=True):
            new, true = (
                _nll(model, tok, req.rewrite_prompt(), req.target_new),
                _nll(model, tok, req.rewrite_prompt(), req.target_true),
            )
            assert new < true and new < nll_before, (req.case_id, new, true, nll_before)


@torch.no_grad()
def _next_token_logprobs(model, tok, prompt: str) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=torch.tensor([tok(prompt).input_ids])).logits[0, -1], -1)


def test_gemma_edit_realises_its_targets_through_the_post_mlp_norm(gemma3, wikitext, counterfact):
    """Gemma 3's tuned MEMIT: per-layer targets are realised (λ 15,000 would realise ~25%), the new target wins,
    and an unrelated prompt's next-token distribution barely moves."""
    from fastedit.stats import ensure_stats

    model, tok = gemma3
    hp = load_hparams("memit", model)
    assert hp.post_norm == "per_layer" and hp.mom2_update_weight <= 3000  # the tuned file, not the family one
    stats = ensure_stats(model, tok, list(hp.layers), dm=10, corpus=str(wikitext), progress=False)
    covs = {k: v.mean for k, v in stats.items()}
    requests = _requests(2, counterfact)
    unrelated = "The chemical symbol of gold is"
    spec = arch_for(model)
    with restored_after(model, spec, hp.layers):
        before = _next_token_logprobs(model, tok, unrelated)
        result = apply_edit(model, tok, requests, method="memit", hparams=hp, stats=covs)
        assert all(d["realised"] > 0.6 for d in result.info["layers"].values()), result.info["layers"]
        for req in requests:
            new = _nll(model, tok, req.rewrite_prompt(), req.target_new)
            true = _nll(model, tok, req.rewrite_prompt(), req.target_true)
            assert new < true, (req.case_id, new, true)
        after = _next_token_logprobs(model, tok, unrelated)
        kl = float((before.exp() * (before - after)).sum())
        assert kl < 0.05, kl


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_prefix_cached_replay_matches_the_full_forward(request, which):
    """The fast v* machinery on the real models: rows aligned at the subject token, the tokens before it in the
    key/value cache, replay from an edit layer: logits at every later token equal the plain full forward's."""
    from fastedit.editing.batching import anchor_pad, right_pad
    from fastedit.editing.replay import LayerReplay
    from fastedit.editing.subject import subject_last_index

    model, tok = request.getfixturevalue(which)
    templates = ["{} is located in the country of", "Yesterday I read that {} plays the", "{} is a"]
    subjects = ["The Eiffel Tower", "Lionel Messi", "Danielle Darrieux"]
    seqs = [tok(t.replace("{}", s)).input_ids for t, s in zip(templates, subjects, strict=True)]
    anchors = [subject_last_index(tok, t, s) for t, s in zip(templates, subjects, strict=True)]
    batch = anchor_pad(seqs, anchors, tok.pad_token_id or 0)
    replay = LayerReplay(model, arch_for(model), 4)
    replay.record(batch.ids, batch.mask, position_ids=batch.position_ids, prefix_len=batch.prefix_len)
    pairs = list(zip(seqs, anchors, strict=True))
    rows = torch.tensor([r for r, (s, a) in enumerate(pairs) for _ in range(a, len(s))])
    tokens = torch.tensor([p for s, a in pairs for p in range(a, len(s))])
    with torch.no_grad():
        replayed = replay.logits_at(rows, tokens - torch.tensor(anchors)[rows])
        ids, mask = right_pad(seqs, tok.pad_token_id or 0)
        full = model(input_ids=ids, attention_mask=mask).logits[rows, tokens]
    assert batch.prefix_len > 0
    scale = float(full.abs().max())
    assert torch.allclose(replayed, full, atol=1e-4 * scale)
    assert torch.equal(replayed.argmax(-1), full.argmax(-1))


# ‖ΔW₂K₁‖/‖WK₁‖ with the published penalty, measured: SmolLM2 < 1e-3; Gemma 3 2.2e-3 at threshold 1e-3, α 0.1 and
# 8.5e-3 at threshold 1e-2, α 1 (the two batches' projected keys are close), so the Gemma 3 file uses
# alphaedit_previous "exact", which removes the earlier keys from the null space.


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_alphaedit_edits_and_preserves_the_earlier_batch(request, which, wikitext, counterfact):
    """AlphaEdit with the shipped hparams on both real models: each batch's edit wins, the update is non-zero,
    and the second batch's update leaves the first batch's keys alone, ‖ΔW₂ K₁‖ ≤ 1e-3 · ‖W K₁‖, with the shipped
    mode and with the exact mode (same v* targets)."""
    from fastedit.arch import mlp_out_matrix
    from fastedit.editing.engine import compute_edit, compute_targets
    from fastedit.stats import ensure_stats

    model, tok = request.getfixturevalue(which)
    hp = load_hparams("alphaedit", model)
    stats = ensure_stats(model, tok, list(hp.layers), dm=10, corpus=str(wikitext), progress=False)
    first, second = _requests(4, counterfact)[:2], _requests(4, counterfact)[2:]
    spec = arch_for(model)
    with restored_after(model, spec, hp.layers):
        one = apply_edit(model, tok, first, method="alphaedit", hparams=hp, stats=stats)
        weights = {layer: mlp_out_matrix(model, spec, layer).detach().clone() for layer in hp.layers}
        targets = compute_targets(model, tok, second, method="alphaedit", hparams=hp)
        modes = [m for m in ("exact",) if m != hp.alphaedit_previous] + [hp.alphaedit_previous]
        for mode in modes:  # the shipped mode's edit stays applied for the checks below
            run = apply_edit if mode == hp.alphaedit_previous else compute_edit
            two = run(
                model, tok, second, method="alphaedit", hparams=hp.replace(alphaedit_previous=mode), stats=stats,
                previous_keys=one.keys, values=targets,
            )  # fmt: skip
            for layer, (a, b) in two.deltas.items():
                k_prev = one.keys[layer].T.float()  # (d_k, 2)
                assert float((a @ b.T).norm()) > 0 and float((one.deltas[layer][0] @ one.deltas[layer][1].T).norm())
                moved = (a @ (b.T @ k_prev)).norm()
                assert moved <= 1e-3 * (weights[layer] @ k_prev).norm(), (mode, layer, float(moved))
        for req in first + second:
            new = _nll(model, tok, req.rewrite_prompt(), req.target_new)
            true = _nll(model, tok, req.rewrite_prompt(), req.target_true)
            assert new < true, (req.case_id, new, true)


def test_gemma_lists_siblings_of_the_subjects_kind_and_preserves_their_keys(gemma3):
    """The model's own list continuation names entities of the subject's kind (countries for a country), never a
    subject of the batch, and the engine reads their keys in each request's template."""
    from fastedit.editing.siblings import list_siblings
    from fastedit.editing.template_neighbours import template_neighbour_keys

    model, tok = gemma3
    requests = [
        EditRequest("canada", "The capital of {} is", "Canada", "London", "Ottawa"),
        EditRequest("japan", "The capital of {} is", "Japan", "Rome", "Tokyo"),
    ]
    found = list_siblings(model, tok, [r.subject for r in requests], per_subject=8)
    countries = {"USA", "United States", "Mexico", "France", "Germany", "Russia", "China", "India", "Brazil",
                 "Australia", "Switzerland", "Italy", "Spain", "Korea", "South Korea", "Norway", "Sweden", "UK",
                 "United Kingdom", "England", "Denmark", "Finland", "Austria", "Belgium", "Netherlands"}  # fmt: skip
    assert len(set(found["Canada"]) & countries) >= 3, found
    assert "Japan" not in found["Canada"] and "Canada" not in found["Japan"]
    keys = template_neighbour_keys(model, tok, arch_for(model), requests, [3, 7], 8, source="model")
    names = {name for v in found.values() for name in v}  # one template: a name both subjects list counts once
    assert set(keys) == {3, 7} and keys[3].shape == (len(names), model.config.intermediate_size)
    assert len(names) >= 6
