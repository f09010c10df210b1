"""The editing core on tiny random models: replay, subject index, contexts, hparams, update rules, engine."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from tiny_models import FAMILIES, TEXT, head_input_contiguity, tiny_model, tiny_tokenizer
from tokenizers import processors

from fastedit.arch import add_at_positions, arch_for, capture, first_tensor, mlp_out_matrix
from fastedit.config import config_to_dict
from fastedit.editing import values as values_module
from fastedit.editing.alphaedit import alphaedit_update
from fastedit.editing.batching import anchor_pad, right_pad
from fastedit.editing.context import context_templates
from fastedit.editing.covariance import DegenerateNullSpaceError, EditCovariance
from fastedit.editing.emmet import emmet_update
from fastedit.editing.engine import EditFailedError, apply_edit, compute_edit
from fastedit.editing.hparams import (
    HPARAMS_DIR,
    EditHparams,
    differences_beyond_v_star,
    hparams_path,
    is_v_star_setting,
    is_variant_name,
    load_hparams,
)
from fastedit.editing.keys import read_at_subject
from fastedit.editing.memit import memit_update
from fastedit.editing.problem import LayerProblem
from fastedit.editing.replay import LayerReplay
from fastedit.editing.rome import rome_update
from fastedit.editing.siblings import list_siblings, parse_siblings
from fastedit.editing.subject import SubjectNotFoundError, subject_last_index
from fastedit.editing.template_neighbours import template_neighbour_keys, template_neighbour_requests
from fastedit.editing.values import NonFiniteLossError, compute_values, edit_site, site_start_layer, values_key
from fastedit.errors import ConfigError
from fastedit.requests import EditRequest

# Subjects end right before the prediction, so a 3-layer random model can carry the edit to the output.
REQUESTS = [
    EditRequest("0", "The Louvre is a museum in {}", "Paris", "Rome", "London"),
    EditRequest("1", "Toko Yasuda plays the {}", "guitar", "Redmond", "piano"),
]
UNRELATED = "Mozart was born in Salzburg"


def peaked(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw the weights with unit-variance signal (std 1/√fan_in): the default 0.02 init gives flat outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                fan_in = 1 if any(e in name for e in ("embed", "wte", "wpe")) else p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model


def key_stats(model: torch.nn.Module, tok, layers) -> dict[int, torch.Tensor]:
    """C0 = mean k kᵀ over every token of the tiny corpus, plus a small ridge (d_k 40 > the token count)."""
    spec = arch_for(model)
    names = [spec.path("mlp_out", layer) for layer in layers]
    rows = [tok(line).input_ids for line in TEXT.splitlines() if line]
    ids, mask = right_pad(rows, tok.pad_token_id)
    with capture(model, names, inputs=True) as rec:
        model(input_ids=ids, attention_mask=mask)
    out = {}
    for layer, name in zip(layers, names, strict=True):
        k = rec[name].input[mask.bool()].double()
        out[layer] = k.T @ k / len(k) + 1e-2 * torch.eye(k.shape[1], dtype=torch.float64)
    return out


def target_nll(model, tok, req: EditRequest, target: str) -> float:
    p = tok(req.rewrite_prompt()).input_ids
    t = tok(" " + target, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + t[:-1]])).logits[0], -1)
    return -sum(logp[len(p) - 1 + j, x].item() for j, x in enumerate(t)) / len(t)


def hp_for(method: str, **kw) -> EditHparams:
    base = {
        "method": method,
        "layers": (1,) if method == "rome" else (0, 1),
        "clamp_norm_factor": 20.0,
        "v_weight_decay": 1e-3,
        "mom2_update_weight": 1.0,
        "v_lr": 1.0,
        "v_lr_relative": True,
        "v_num_grad_steps": 10,
        "kl_factor": 0.0,
        "context_seeds": ("The", "I"),
        "context_length": 5,
        "nullspace_threshold": 5e-2,
        "alphaedit_l2": 1e-3,
    }
    return EditHparams(**{**base, **kw})


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---- machinery -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama", "gemma2", "gemma3_text"])
def test_replay_matches_full_forward(family, tok):
    model = peaked(tiny_model(family))
    ids, mask = right_pad([tok("The Eiffel Tower is located in").input_ids, tok("Mozart was").input_ids], 0)
    full = model(input_ids=ids, attention_mask=mask).logits
    replay = LayerReplay(model, arch_for(model), 1)
    replay.record(ids, mask)
    rows, pos = torch.tensor([0, 0, 1]), torch.tensor([1, 5, 2])
    assert torch.allclose(replay.logits_at(rows, pos), full[rows, pos], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cached_replay_matches_full_forward(family, tok):
    """Rows aligned at an anchor token, the columns before it cached once: every later column's logits are the
    full forward's, step after step (the cache is reset between steps), and δ at the anchor reaches them."""
    model = peaked(tiny_model(family))
    spec = arch_for(model)
    seqs = [tok(p).input_ids for p in ("The Eiffel Tower is located in", "Mozart was", "I think that Rome is in")]
    anchors = [3, 1, 5]
    pairs = list(zip(seqs, anchors, strict=True))
    ids, mask = right_pad(seqs, 0)
    batch = anchor_pad(seqs, anchors, 0)
    assert batch.prefix_len == 5 and batch.ids.shape[1] == 5 + max(len(s) - a for s, a in pairs)
    replay = LayerReplay(model, spec, 1)
    replay.record(batch.ids, batch.mask, position_ids=batch.position_ids, prefix_len=batch.prefix_len)
    rows = torch.tensor([r for r, (s, a) in enumerate(pairs) for _ in range(a, len(s))])
    tokens = torch.tensor([p for s, a in pairs for p in range(a, len(s))])
    columns = tokens - torch.tensor(anchors)[rows]
    full = model(input_ids=ids, attention_mask=mask).logits
    for _ in range(2):
        assert torch.allclose(replay.logits_at(rows, columns), full[rows, tokens], atol=1e-5)
    delta = torch.randn(spec.text_config(model.config).hidden_size)
    site = spec.path("block", 1)
    with add_at_positions(model, site, delta, torch.tensor(anchors)):
        edited = model(input_ids=ids, attention_mask=mask).logits
    with add_at_positions(model, site, delta, torch.zeros(3, dtype=torch.long)):
        replayed = replay.logits_at(rows, columns)
    assert not torch.allclose(edited[rows, tokens], full[rows, tokens], atol=1e-3)
    assert torch.allclose(replayed, edited[rows, tokens], atol=1e-4)


def test_anchor_pad_rejects_an_anchor_outside_its_row():
    with pytest.raises(ValueError, match="row 1: anchor 2"):
        anchor_pad([[1, 2, 3], [4, 5]], [0, 2], 0)


def test_subject_index_is_bos_aware(tok):
    template = "The mother tongue of {} is"
    ids = tok(template.replace("{}", "Danielle Darrieux")).input_ids
    idx = subject_last_index(tok, template, "Danielle Darrieux")
    assert tok.decode(ids[: idx + 1]).endswith("Darrieux") and not tok.decode(ids[:idx]).endswith("Darrieux")
    bos_tok = copy.deepcopy(tok)
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert bos_tok(template).input_ids[0] == tok.bos_token_id
    assert subject_last_index(bos_tok, template, "Danielle Darrieux") == idx + 1
    # Subject at the very start: the BOS alone is the prefix.
    assert subject_last_index(bos_tok, "{} is", "Paris") == len(tok("Paris").input_ids)


def test_subject_errors_name_the_case(tok):
    with pytest.raises(SubjectNotFoundError, match=r"case 7.*no '\{\}'"):
        subject_last_index(tok, "Paris is in France", "Paris", "7")
    with pytest.raises(SubjectNotFoundError, match=r"case 8.*empty"):
        subject_last_index(tok, "{} is in", "  ", "8")


def test_context_templates_are_seeded(tok):
    model = tiny_model("llama", seed=3)
    a = context_templates(model, tok, length=6, seed=1)
    b = context_templates(model, tok, length=6, seed=1)
    assert a == b and a[0] == "{}" and len(a) == 6
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in a[1:])


# ---- hparams -------------------------------------------------------------------------------------------


def test_hparams_files_load_and_model_file_wins():
    for method in ("rome", "memit", "emmet", "alphaedit"):
        for family in ("gpt2", "gptj", "llama", "mistral", "qwen2", "gemma3_text"):
            assert load_hparams(method, family).method == method
    assert hparams_path("memit", "smollm2-135m").stem == "smollm2-135m"
    assert hparams_path("memit", "llama").stem == "llama"
    assert load_hparams("memit", "gpt2").layers == (13, 14, 15, 16, 17)


def test_hparams_variants_change_only_the_v_star_settings():
    """A ``<model>-<variant>.json`` (``-lite``, ``-early-stop``, ``-fast``, ``-thorough``) is its model's file with
    another v*: same layers, λ and solve, so a comparison of the two measures the v* settings alone
    (benchmarks/edit_speed.py --lite relies on it)."""
    variants = {}
    for path in sorted(HPARAMS_DIR.glob("*/*-*.json")):
        bases = [b for b in path.parent.glob("*.json") if path.stem.startswith(b.stem + "-")]
        if bases:
            variants[path] = max(bases, key=lambda b: len(b.stem))
    assert {p.stem for p in variants} >= {
        "smollm2-135m-lite",
        "smollm2-135m-early-stop",
        "smollm2-135m-thorough",
        "gemma3-270m-fast",
    }
    for path, base in variants.items():
        method = path.parent.name
        variant, full = load_hparams(method, "", path), load_hparams(method, "", base)
        variant_d, full_d = config_to_dict(variant), config_to_dict(full)
        assert any(variant_d[k] != full_d[k] for k in variant_d if is_v_star_setting(k)), path.name
        assert differences_beyond_v_star(variant, full) == [], path.name


def test_hparams_variants_are_chosen_by_name(tmp_path, monkeypatch):
    """``--hparams fast`` picks ``<model>-fast.json`` beside the model's file (an installed package has no hparams/
    folder to point at); an unknown name lists the shipped ones; an existing file of that name stays a file."""
    fast = load_hparams("memit", "gemma3-270m", variant="fast")
    assert fast == load_hparams("memit", "", HPARAMS_DIR / "memit" / "gemma3-270m-fast.json")
    assert fast != load_hparams("memit", "gemma3-270m")
    assert hparams_path("memit", "smollm2-135m", "thorough").name == "smollm2-135m-thorough.json"
    with pytest.raises(
        ConfigError, match=r"variant 'quick' for smollm2-135m.*shipped variants: early-stop, lite, thorough"
    ):
        load_hparams("memit", "smollm2-135m", variant="quick")
    monkeypatch.chdir(tmp_path)
    assert is_variant_name("fast") and is_variant_name("early-stop")
    assert not is_variant_name("h.json") and not is_variant_name("dir/fast") and not is_variant_name("Fast.JSON")
    (tmp_path / "fast").write_text("{}")
    assert not is_variant_name("fast")  # a file of that name is read as the file


def test_values_key_shares_only_equal_targets():
    spec = arch_for(tiny_model("llama"))
    memit, emmet = load_hparams("memit", "llama"), load_hparams("emmet", "llama")
    assert values_key(spec, memit) == values_key(spec, emmet)  # λ/μ/method do not change v*
    assert values_key(spec, memit) == values_key(spec, memit.replace(mom2_update_weight=1.0))
    assert values_key(spec, memit) != values_key(spec, memit.replace(v_lr=0.1))
    assert values_key(spec, memit) != values_key(spec, memit.replace(layers=(4, 5, 6)))  # another site
    gemma = arch_for(tiny_model("gemma3_text"))
    hp = load_hparams("memit", "gemma3_text")  # per-layer sites: the lower layers matter too
    assert values_key(gemma, hp) != values_key(gemma, hp.replace(layers=hp.layers[1:]))


def test_hparams_are_strict(tmp_path):
    bad = tmp_path / "h.json"
    bad.write_text('{"method": "memit", "layers": [4], "clamp_norm_factor": 4, "v_weight_decay": 0.1, "lr": 1}')
    with pytest.raises(ConfigError, match=r"unknown key.*lr"):
        load_hparams("memit", "llama", bad)
    with pytest.raises(ConfigError, match="not 'rome'"):
        load_hparams("rome", "llama", hparams_path("memit", "llama"))
    with pytest.raises(ConfigError, match="no memit hparams"):
        load_hparams("memit", "nosuchfamily")
    with pytest.raises(ConfigError, match=r"template_neighbours_source 'web' is not one of batch, model"):
        load_hparams("memit", "llama").replace(template_neighbours_source="web")


def test_layer_beyond_depth_is_a_clear_error(tok):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"layers \[7\] are outside this model's 3 layers"):
        apply_edit(model, tok, REQUESTS, method="memit", hparams=hp_for("memit", layers=(1, 7)), stats={})


# ---- update rules ----------------------------------------------------------------------------------------


def _random_problem(d=6, d_k=9, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, n, generator=g, dtype=torch.float64)
    k = torch.randn(d_k, n, generator=g, dtype=torch.float64)
    x = torch.randn(d_k, 50, generator=g, dtype=torch.float64)
    return r, k, x @ x.T / 50


def _problem(r, k, c0, lam=5.0, rel_eps=0.0, previous=None, bare=None, template=None, **hp):
    hparams = EditHparams(method="memit", layers=(0,), clamp_norm_factor=1, v_weight_decay=0, **hp)
    cov = EditCovariance(c0, lam=lam, rel_eps=rel_eps, device="cpu")
    return LayerProblem(r, k, cov, hparams, previous_keys=previous, bare_keys=bare, template_keys=template)


def test_rome_writes_the_residual_exactly():
    r, k, c0 = _random_problem(n=1)
    k_star = k + 0.1
    up = rome_update(_problem(r, k_star, c0, lam=100.0, bare=k))
    assert torch.allclose((up.a @ up.b.T) @ k, r)


def test_memit_solves_its_normal_equations():
    r, k, c0 = _random_problem()
    up = memit_update(_problem(r, k, c0))
    # argmin_Δ ‖Δ K − R‖² + λ tr(Δ C0 Δᵀ)  ⇔  Δ (λ C0 + K Kᵀ) = R Kᵀ
    assert torch.allclose((up.a @ up.b.T) @ (5.0 * c0 + k @ k.T), r @ k.T)


def test_emmet_meets_its_equality_constraints_for_a_batch():
    """EMMET's point: ΔW K = R exactly for B > 1 (MEMIT at any λ only approximates it)."""
    r, k, c0 = _random_problem(n=4)
    up = emmet_update(_problem(r, k, c0))
    assert torch.allclose((up.a @ up.b.T) @ k, r, atol=1e-10)
    assert up.info["constraint_residual"] < 1e-10
    for lam in (1e-3, 1.0, 1e3):  # no λ makes MEMIT satisfy them
        memit = memit_update(_problem(r, k, c0, lam=lam))
        assert not torch.allclose((memit.a @ memit.b.T) @ k, r, atol=1e-6)


def test_emmet_preserves_generic_keys_in_the_c_norm():
    """Among all Δ with Δ K = R, EMMET's minimises tr(Δ C Δᵀ): any other solution costs more."""
    r, k, c0 = _random_problem(n=3)
    up = emmet_update(_problem(r, k, c0))
    delta = up.a @ up.b.T
    g = torch.Generator().manual_seed(3)
    null = torch.eye(9, dtype=torch.float64) - k @ torch.linalg.pinv(k)  # directions with N K = 0
    other = delta + torch.randn(6, 9, generator=g, dtype=torch.float64) @ null
    cost = lambda d: float(torch.trace(d @ (5.0 * c0) @ d.T))  # noqa: E731
    assert torch.allclose(other @ k, r) and cost(other) > cost(delta)


def test_emmet_with_mu_is_memit_at_lambda_times_mu():
    """The Woodbury identity: R (KᵀC⁻¹K + μI)⁻¹ KᵀC⁻¹ = MEMIT at λ·μ, so μ > 0 is recorded as such."""
    r, k, c0 = _random_problem(n=4)
    relaxed = emmet_update(_problem(r, k, c0, lam=5.0, emmet_mu=0.1))
    memit = memit_update(_problem(r, k, c0, lam=0.5))
    assert torch.allclose(relaxed.a @ relaxed.b.T, memit.a @ memit.b.T, atol=1e-10)
    assert relaxed.info["equivalent_memit_lambda"] == pytest.approx(0.5)


def test_emmet_with_coinciding_keys_solves_what_it_can():
    """The same subject twice gives the same key: the constraints conflict; the solve stays finite and says so."""
    r, k, c0 = _random_problem(n=3)
    k[:, 2] = k[:, 1]
    up = emmet_update(_problem(r, k, c0))
    assert torch.isfinite(up.b).all() and up.info["dropped_constraints"] == 1
    assert torch.allclose((up.a @ up.b.T) @ k[:, :1], r[:, :1], atol=1e-8)


@pytest.mark.parametrize("rule", [memit_update, emmet_update, alphaedit_update])
def test_template_neighbour_keys_are_preserved_by_every_rule(rule):
    """w·K_t K_tᵀ in what the update preserves: a large w drives ΔW K_t towards 0, w = 0 leaves the update as it
    was, and EMMET still meets its constraints."""
    r, k, _ = _random_problem(n=2)
    _, c0 = _low_rank_c0([5.0, 3, 2, 1, 0.5, 0, 0, 0, 0])  # AlphaEdit needs a null space
    kt = torch.randn(9, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)  # 2 + 2 ≤ 4 null dims
    settings = {"rel_eps": 1e-3, "nullspace_threshold": 1e-3, "alphaedit_l2": 1e-5}  # ε: C0 here has rank 5
    off = rule(_problem(r, k, c0, template=kt, **settings))
    unweighted = rule(_problem(r, k, c0, **settings))
    strong = rule(_problem(r, k, c0, template=kt, template_neighbours_weight=1e4, **settings))
    moved = lambda up: float(((up.a @ up.b.T) @ kt).norm())  # noqa: E731
    assert torch.allclose(off.a @ off.b.T, unweighted.a @ unweighted.b.T)
    assert moved(strong) < 1e-2 * moved(off)
    assert float(((strong.a @ strong.b.T) @ k - r).norm() / r.norm()) < (1e-8 if rule is emmet_update else 0.5)


def test_template_neighbours_fill_each_template_with_other_subjects_only():
    reqs = [
        EditRequest("a", "The currency of {} is", "Japan", "dollar"),
        EditRequest("b", "The currency of {} is", "France", "dollar"),
        EditRequest("c", "The capital of {} is", "Peru", "Rome"),
    ]
    pairs = [(n.prompt, n.subject) for n in template_neighbour_requests(reqs, 5)]
    # Edited pairs (currency of Japan/France) are never neighbours; each pair once.
    assert sorted(pairs) == [
        ("The capital of {} is", "France"),
        ("The capital of {} is", "Japan"),
        ("The currency of {} is", "Peru"),
    ]
    assert [(n.prompt, n.subject) for n in template_neighbour_requests(reqs, 1)] == [
        (n.prompt, n.subject) for n in template_neighbour_requests(reqs, 1)
    ]  # seeded
    assert len(template_neighbour_requests(reqs, 1)) == 2  # the second currency request has nobody left
    assert template_neighbour_requests(reqs[:1], 3) == []


def test_template_neighbours_from_siblings_fill_each_template_with_those_names():
    reqs = [
        EditRequest("a", "The capital of {} is", "Canada", "London"),
        EditRequest("b", "The capital of {} is", "Norway", "Paris"),
    ]
    siblings = {"Canada": ["Mexico", "Norway", "Japan", "Chile"], "Norway": ["Sweden"]}
    pairs = [(n.prompt, n.subject) for n in template_neighbour_requests(reqs, 2, siblings)]
    # the batch edits the capital of Norway, so Norway is never a neighbour; at most 2 per request
    assert pairs == [("The capital of {} is", "Mexico"), ("The capital of {} is", "Japan"),
                     ("The capital of {} is", "Sweden")]  # fmt: skip


def test_sibling_names_are_read_from_the_first_line_of_a_list():
    text = " Norway, the United States and Japan<start_of_image>, a country with lakes, Canada... (Chile)\nPeru, Cuba"
    assert parse_siblings(text, exclude={"Canada"}) == ["Norway", "United States", "Japan", "Chile"]
    assert parse_siblings("", exclude=set()) == []


def test_siblings_are_sampled_per_subject_and_leave_the_random_state_alone(tok):
    """A subject's siblings do not depend on which other subjects are asked for, or on a cache; the batch's own
    subjects are never siblings; the caller's RNG is untouched."""
    import fastedit.editing.siblings as siblings_module

    model = tiny_model("llama")
    state = torch.random.get_rng_state()
    texts = []
    for subjects in (["Canada"], ["Peru", "Canada"]):
        siblings_module._CACHE.clear()
        texts.append(siblings_module._listed(model, tok, subjects, 0, False)["Canada"])
    assert texts[0] == texts[1] and len(texts[0]) == siblings_module.SAMPLES
    assert torch.equal(torch.random.get_rng_state(), state)
    found = list_siblings(model, tok, ["Canada", "Peru"], per_subject=3)
    assert set(found) == {"Canada", "Peru"}
    assert all(len(v) <= 3 and "Peru" not in v and "Canada" not in v for v in found.values())


@pytest.mark.parametrize("family", ["gpt_neox", "llama", "gemma3", "gemma3_text", "gemma3_text/window 512"])
def test_batched_sibling_sampler_continues_each_prompt_as_generate_does(family, tok):
    """With top-1 sampling the batched sampler (shared prompt cached once, rows padded after it) writes, for every
    subject of a batch of different lengths, the first line `generate` writes for that prompt alone. The tiny
    Gemma 3 attends through a 4-token sliding window (subjects batched by length); with a window wider than the
    rows, as real Gemma 3's 512, the rows are padded like every other family's."""
    from fastedit.editing.siblings import LIST_PROMPT, MAX_NEW_TOKENS, sample_lists

    model = tiny_model(family.split("/")[0])
    if family.endswith("window 512"):
        model.config.sliding_window = 512
    subjects = ["Canada", "the United Kingdom of Great Britain", "Peru"]
    with head_input_contiguity(model) as contiguous:  # gathered rows, not a strided view
        texts = sample_lists(model, tok, subjects, top_k=1)
    assert contiguous and all(contiguous)
    for subject, samples in zip(subjects, texts, strict=True):
        ids = tok(f"{LIST_PROMPT}{subject},", return_tensors="pt").input_ids
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        assert len(set(samples)) == 1 and samples[0].split("\n")[0] == expected


def _low_rank_c0(spectrum):
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64)).Q
    return basis, basis @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ basis.T


def test_alphaedit_leaves_generic_and_earlier_keys_alone_and_still_edits():
    r, k, _ = _random_problem(n=2)
    basis, c0 = _low_rank_c0([5.0, 3, 2, 1, 0.5, 0, 0, 0, 0])
    # Keys with a part outside C0's span (as real edit keys have); earlier keys likewise.
    previous = torch.randn(9, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    up = alphaedit_update(_problem(r, k, c0, previous=previous, nullspace_threshold=1e-3, alphaedit_l2=1e-5))
    delta = up.a @ up.b.T
    assert up.info["nullspace_dim"] == 4
    assert delta.norm() > 0.1 * r.norm() / k.norm()  # an edit happened
    preserved = basis[:, :5]  # directions the generic keys use
    assert (delta @ preserved).abs().max() < 1e-8
    assert (delta @ previous).norm() <= 1e-3 * (delta @ k).norm()


def test_alphaedit_exact_mode_keeps_close_earlier_keys_where_the_penalty_leaks():
    """This batch's key nearly repeats an earlier one: the published penalty leaves a part of ΔW on the earlier
    key; "exact" removes the earlier keys' directions from the null space and leaves them untouched."""
    r, k, _ = _random_problem(n=1)
    basis, c0 = _low_rank_c0([5.0, 3, 2, 1, 0.5, 0, 0, 0, 0])
    g = torch.Generator().manual_seed(3)
    previous = torch.cat([k + 0.05 * torch.randn(9, 1, generator=g, dtype=torch.float64),
                          torch.randn(9, 1, generator=g, dtype=torch.float64)], dim=1)  # fmt: skip
    leaks = {}
    for mode in ("penalty", "exact"):
        up = alphaedit_update(
            _problem(r, k, c0, previous=previous, nullspace_threshold=1e-3, alphaedit_l2=1.0, alphaedit_previous=mode)
        )
        delta = up.a @ up.b.T
        assert delta.norm() > 0.05 * r.norm() / k.norm()  # both still edit
        assert (delta @ basis[:, :5]).abs().max() < 1e-8  # and both leave C0's span alone
        leaks[mode] = float((delta @ previous).norm() / (delta @ k).norm())
        dims = up.info["nullspace_dim"]
    assert leaks["penalty"] > 1e-2
    assert leaks["exact"] < 1e-10
    assert dims == 2  # 4 null dimensions less the 2 earlier keys'


def test_alphaedit_exact_mode_warns_when_a_key_repeats_an_earlier_one(caplog):
    r, k, _ = _random_problem(n=2)
    _, c0 = _low_rank_c0([5.0, 3, 2, 1, 0.5, 0, 0, 0, 0])
    with caplog.at_level("WARNING", logger="fastedit.editing.alphaedit"):
        up = alphaedit_update(
            _problem(r, k, c0, previous=k[:, :1], nullspace_threshold=1e-3, alphaedit_previous="exact")
        )
    assert "1 of 2 keys lie in the span of earlier batches' keys" in caplog.text
    assert (up.a @ up.b.T @ k[:, :1]).norm() < 1e-10 * r.norm()


def test_alphaedit_exact_mode_with_a_full_null_space_is_an_error():
    r, k, _ = _random_problem(n=1)
    _, c0 = _low_rank_c0([5.0, 3, 2, 1, 0.5, 0, 0, 0, 0])
    previous = torch.randn(9, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with pytest.raises(DegenerateNullSpaceError, match=r"earlier keys fill the whole null space"):
        alphaedit_update(_problem(r, k, c0, previous=previous, nullspace_threshold=1e-3, alphaedit_previous="exact"))


def test_alphaedit_threshold_is_relative_to_the_keys_scale():
    r, k, _ = _random_problem(n=2)
    for scale in (1e-4, 1.0, 1e4):  # the same keys in other units: the same null space
        _, c0 = _low_rank_c0([5.0 * scale, 3 * scale, 2 * scale, 1e-5 * scale, 0, 0, 0, 0, 0])
        up = alphaedit_update(_problem(r, k, c0, nullspace_threshold=1e-3))
        assert up.info["nullspace_dim"] == 6


def test_alphaedit_degenerate_null_space_is_an_error():
    r, k, _ = _random_problem(n=2)
    _, full_rank = _low_rank_c0([5.0, 4, 3, 2, 1.5, 1.2, 1.1, 1.0, 0.9])
    with pytest.raises(DegenerateNullSpaceError, match=r"empty.*raise nullspace_threshold"):
        alphaedit_update(_problem(r, k, full_rank, nullspace_threshold=1e-3))


def test_alphaedit_projector_is_computed_once_per_covariance(monkeypatch):
    r, k, _ = _random_problem(n=2)
    _, c0 = _low_rank_c0([5.0, 3, 2, 1, 0.5, 0, 0, 0, 0])
    problem = _problem(r, k, c0, nullspace_threshold=1e-3)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: calls.append(1) or eigh(m))
    for _ in range(3):
        alphaedit_update(problem)
    assert len(calls) == 1


def test_lambda_and_relative_eps_are_applied_once():
    """C = λ·C0 + εI with ε = rel_eps·λ·tr(C0)/d_k; a singular C0 (d_m < 1) stays solvable."""
    _, c0 = _low_rank_c0([5.0, 3, 0, 0, 0, 0, 0, 0, 0])
    cov = EditCovariance(c0, lam=10.0, rel_eps=1e-6, device="cpu")
    eps = 1e-6 * 10.0 * float(torch.trace(c0)) / 9
    assert float(cov.eps) == pytest.approx(eps)
    assert torch.allclose(cov.matrix, 10.0 * c0 + eps * torch.eye(9, dtype=torch.float64))
    assert torch.linalg.matrix_rank(cov.matrix) == 9
    # Scaling C0 scales ε with it: the regularisation means the same at every key scale.
    assert float(EditCovariance(c0 * 1e4, lam=10.0, rel_eps=1e-6, device="cpu").eps) == pytest.approx(eps * 1e4)


# ---- the engine --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "family"),
    [
        ("memit", "llama"),
        ("rome", "llama"),
        ("emmet", "llama"),
        ("alphaedit", "llama"),
        ("memit", "gpt2"),
        ("memit", "gemma3_text"),
        ("rome", "gemma3_text"),
        ("emmet", "gemma3_text"),
    ],
)
def test_edit_moves_the_targets_and_reports_factors(method, family, tok):
    model = peaked(tiny_model(family))
    hp = hp_for(method)
    stats = key_stats(model, tok, hp.layers)
    spec = arch_for(model)
    before_w = {layer: mlp_out_matrix(model, spec, layer).detach().clone() for layer in hp.layers}
    before = [target_nll(model, tok, r, r.target_new) for r in REQUESTS]
    result = apply_edit(model, tok, REQUESTS, method=method, hparams=hp, stats=stats)
    after = [target_nll(model, tok, r, r.target_new) for r in REQUESTS]
    assert sum(after) < sum(before) - 0.3, (before, after)
    assert set(result.deltas) == set(hp.layers)
    for layer, (a, b) in result.deltas.items():
        assert a.dtype == b.dtype == torch.float32 and a.shape == (24, 2) and b.shape == (40, 2)
        change = mlp_out_matrix(model, spec, layer) - before_w[layer]
        assert torch.allclose(change, a @ b.T, atol=1e-5)
    assert [r["case_id"] for r in result.info["requests"]] == ["0", "1"]
    assert result.info["method"] == method and result.info["hparams"]["layers"] == list(hp.layers)
    if spec.post_mlp_norm and method != "rome":  # Gemma: one δ per edited layer, on its own mlp_out output
        assert list(result.info["site"]) == [spec.path("mlp_out", layer) for layer in hp.layers]


def test_compute_edit_leaves_the_model_unedited(tok):
    model = peaked(tiny_model("llama"))
    hp = hp_for("memit")
    stats = key_stats(model, tok, hp.layers)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    computed = compute_edit(model, tok, REQUESTS, method="memit", hparams=hp, stats=stats)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    applied = apply_edit(model, tok, REQUESTS, method="memit", hparams=hp, stats=stats)
    for layer in hp.layers:
        assert torch.allclose(computed.deltas[layer][0], applied.deltas[layer][0], atol=1e-5)


def test_failure_midway_restores_every_weight(tok):
    model = peaked(tiny_model("llama"))
    hp = hp_for("memit")
    stats = key_stats(model, tok, hp.layers)
    stats[1] = stats[1] * float("nan")  # layer 0's delta is applied before layer 1's solve fails
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EditFailedError, match="layer 1"):
        apply_edit(model, tok, REQUESTS, method="memit", hparams=hp, stats=stats)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_non_finite_loss_names_the_request(tok):
    model = peaked(tiny_model("llama"))
    hp = hp_for("rome")
    stats = key_stats(model, tok, hp.layers)
    context_templates(model, tok, seeds=hp.context_seeds, length=hp.context_length)  # cached before the damage
    bad_tokens = tok(" plays", add_special_tokens=False).input_ids  # one token
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_tokens] = float("nan")  # only request "1" has this token
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="case 1"):
        apply_edit(model, tok, REQUESTS, method="rome", hparams=hp, stats=stats)
    # Request "0" had been applied already: it is rolled back too (bit-exact; NaN == NaN for the damaged rows).
    assert all(torch.allclose(state[k], v, rtol=0, atol=0, equal_nan=True) for k, v in model.state_dict().items())


def test_stats_for_another_model_are_refused(tok):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="shape"):
        apply_edit(
            model, tok, REQUESTS, method="memit", hparams=hp_for("memit"), stats={0: torch.eye(5), 1: torch.eye(5)}
        )


def test_v_modes_agree(tok):
    """Fast and batched modes compute the same optimisation as the reference loop (stopping rules aside)."""
    model = peaked(tiny_model("llama"))
    spec = arch_for(model)
    contexts = context_templates(model, tok, seeds=("The", "I"), length=5)
    site = edit_site(spec, hp_for("memit"))
    runs = {}
    for mode in ("reference", "fast", "batched"):
        hp = hp_for("memit", v_mode=mode, v_nll_stop=0.0, v_nll_patience=1000)
        runs[mode] = compute_values(model, tok, spec, REQUESTS, site=site, layer=1, contexts=contexts, hp=hp)
    ref = runs["reference"].targets
    for mode in ("fast", "batched"):
        assert torch.allclose(runs[mode].targets, ref, rtol=1e-3, atol=1e-3 * float(ref.norm(dim=1).max()))
    # With its convergence stop on, the fast mode ends no worse than noise away from the reference loss.
    hp = hp_for("memit", v_mode="fast")
    fast = compute_values(model, tok, spec, REQUESTS, site=site, layer=1, contexts=contexts, hp=hp)
    for f, r in zip(fast.info, runs["reference"].info, strict=True):
        assert f["steps"] <= r["steps"] and f["nll_end"] < f["nll_start"]


def test_every_v_mode_stops_by_the_same_rules(tok):
    """An hparams file's v_nll_stop ends the reference loop where it ends batched v*: the mode changes how the
    targets are computed, not how far v* runs (a reference run to its loss threshold over-edits such a file)."""
    model = peaked(tiny_model("llama"))
    spec = arch_for(model)
    contexts = context_templates(model, tok, seeds=("The", "I"), length=5)
    runs = {}
    for mode in ("reference", "batched"):
        # The tiny model's target NLL starts above 6: a stop at 5.6 ends v* early, the stall rule is off.
        hp = hp_for("memit", v_mode=mode, v_nll_stop=5.6, v_nll_patience=1000, v_num_grad_steps=30)
        site = edit_site(spec, hp)
        runs[mode] = compute_values(model, tok, spec, REQUESTS, site=site, layer=1, contexts=contexts, hp=hp)
    steps = {mode: [item["steps"] for item in run.info] for mode, run in runs.items()}
    assert steps["reference"] == steps["batched"] and max(steps["reference"]) < 30
    assert all(item["nll_start"] > 5.6 > item["nll_end"] for item in runs["reference"].info)
    ref = runs["reference"].targets
    assert torch.allclose(runs["batched"].targets, ref, rtol=1e-3, atol=1e-3 * float(ref.norm(dim=1).max()))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_converged_requests_leave_the_batch_with_the_same_targets(tok, monkeypatch, family):
    """Batched v* drops converged requests' rows from later steps by slicing the recorded forward (no second
    recording); the targets are those of keeping every row. Gemma 3: per-layer sites and sliding-window caches."""
    model = peaked(tiny_model(family))
    spec = arch_for(model)
    contexts = context_templates(model, tok, seeds=("The", "I"), length=5)
    requests = [
        *REQUESTS,
        EditRequest("2", "{} was born in", "Mozart", "Tokyo", "Salzburg"),
        EditRequest("3", "The {} flows through", "Nile", "Japan", "Egypt"),
    ]
    hp = hp_for("memit", v_mode="batched", v_nll_stop=0.5, v_num_grad_steps=30)
    site, layer = edit_site(spec, hp), site_start_layer(spec, hp)
    runs, rows_per_step, recordings = {}, {}, {}
    for narrow in (0.0, 1.0):  # 0: every row to the end
        monkeypatch.setattr(values_module, "NARROW_BELOW", narrow)
        seen: list[int] = []
        embedded: list[int] = []  # the embeddings run only when a forward is recorded
        hooks = [
            model.model.layers[-1].register_forward_hook(lambda _m, _a, out, s=seen: s.append(len(first_tensor(out)))),
            model.get_input_embeddings().register_forward_hook(lambda *_, e=embedded: e.append(1)),
        ]
        try:
            runs[narrow] = compute_values(model, tok, spec, requests, site=site, layer=layer, contexts=contexts, hp=hp)
        finally:
            for handle in hooks:
                handle.remove()
        rows_per_step[narrow], recordings[narrow] = seen, len(embedded)
    steps = [item["steps"] for item in runs[1.0].info]
    assert min(steps) < max(steps) < 30  # one request converges early, one late, all before the step limit
    assert steps == [item["steps"] for item in runs[0.0].info]
    assert len(set(rows_per_step[0.0][2:])) == 1  # steps all run the same rows without dropping
    assert rows_per_step[1.0][-2] < rows_per_step[1.0][2]  # late steps run fewer rows
    assert recordings[1.0] == recordings[0.0] == 2  # one prefix pass and one suffix pass, however rows drop
    # Every other forward is a step's (the KL reference comes from the first, unedited one), plus, with per-layer
    # sites, the one that reads each site's final value.
    final = 1 if isinstance(site, tuple) else 0
    assert len(rows_per_step[1.0]) == recordings[1.0] + max(steps) + final
    ref = runs[0.0].targets
    assert float((runs[1.0].targets - ref).abs().max() / ref.abs().max()) <= 1e-5
    for a, b in zip(runs[1.0].info, runs[0.0].info, strict=True):
        assert a["nll_end"] == pytest.approx(b["nll_end"], rel=1e-5, abs=1e-6)


def test_a_v_star_site_below_the_replayed_layers_is_a_clear_error(tok):
    """A δ at a site the replay never runs would change nothing: v* refuses it instead of returning h."""
    model = tiny_model("llama")
    spec = arch_for(model)
    contexts = context_templates(model, tok, seeds=("The",), length=5)
    hp = hp_for("memit", v_mode="batched")
    with pytest.raises(ValueError, match="below the replay start layer 1"):
        compute_values(model, tok, spec, REQUESTS, site=spec.path("block", 0), layer=1, contexts=contexts, hp=hp)


def test_v_star_loss_and_its_gradient_match_the_plain_formula():
    """The written-out NLL + KL (and its backward) equal log-softmax, gather and KL by autograd."""
    gen = torch.Generator().manual_seed(0)
    n_req, m, vocab = 3, 5, 11
    rows = values_module._Rows(
        read_label=[1, 4, 4, 0, 10], read_weight=[0.5, 0.5, 1.0, 0.25, 0.75], read_owner=[0, 0, 1, 2, 2]
    )
    kl_before = torch.log_softmax(torch.randn(n_req, vocab, generator=gen, dtype=torch.float64), -1)
    delta = torch.randn(n_req, 2, 4, generator=gen, dtype=torch.float64)
    h_norm = torch.rand(n_req, 2, generator=gen, dtype=torch.float64) + 1
    hp = hp_for("memit", kl_factor=0.3)
    loss_weights = torch.rand(n_req, generator=gen, dtype=torch.float64)
    base = torch.randn(m + n_req, vocab, generator=gen, dtype=torch.float64)

    logits = base.clone().requires_grad_(True)
    loss, nll = values_module._losses(logits, rows, kl_before, delta, h_norm, hp)
    (loss * loss_weights).sum().backward()

    plain = base.clone().requires_grad_(True)
    logp = torch.log_softmax(plain, -1)
    token_lp = logp[:m].gather(1, torch.tensor(rows.read_label)[:, None]).squeeze(1)
    want_nll = torch.zeros(n_req, dtype=torch.float64).index_add(
        0, torch.tensor(rows.read_owner), -token_lp * torch.tensor(rows.read_weight, dtype=torch.float64)
    )
    kl = (logp[m:].exp() * (logp[m:] - kl_before)).sum(-1)
    want = want_nll + hp.kl_factor * kl + hp.v_weight_decay * (delta.norm(dim=2) / h_norm**2).sum(dim=1)
    (want * loss_weights).sum().backward()
    assert torch.allclose(nll, want_nll) and torch.allclose(loss, want)
    assert torch.allclose(logits.grad, plain.grad, rtol=1e-10, atol=1e-12)


def test_batched_chunks_hold_requests_of_similar_width_and_targets_come_back_in_request_order(tok, monkeypatch):
    """Chunks group requests by row width (less padding); the targets are each request's own, in file order."""
    model = peaked(tiny_model("llama"))
    spec = arch_for(model)
    contexts = context_templates(model, tok, seeds=("The", "I"), length=5)
    requests = [
        EditRequest("long", "{} is a museum that many visitors from all over the world go to see in", "Louvre",
                    "Rome", "Paris"),
        EditRequest("short", "{} plays", "Toko Yasuda", "piano", "guitar"),
        EditRequest("longer", "{} was a composer whose music is still played in concert halls in", "Mozart",
                    "Tokyo", "Vienna"),
        EditRequest("shorter", "{} flows", "Nile", "north", "south"),
    ]  # fmt: skip
    monkeypatch.setattr(values_module, "BATCH_CHUNK", 2)
    chunks = values_module.chunks_by_width(tok, requests, contexts, "{} is a")
    assert sorted(map(sorted, chunks)) == [[0, 2], [1, 3]]  # file order would pair a long with a short one
    site = edit_site(spec, hp_for("memit"))
    runs = {}
    for mode in ("fast", "batched"):
        hp = hp_for("memit", v_mode=mode, v_nll_stop=0.0, v_nll_patience=1000, v_num_grad_steps=8)
        runs[mode] = compute_values(model, tok, spec, requests, site=site, layer=1, contexts=contexts, hp=hp)
    assert [item["case_id"] for item in runs["batched"].info] == [r.case_id for r in requests]
    ref = runs["fast"].targets
    assert float((runs["batched"].targets - ref).abs().max() / ref.abs().max()) <= 1e-4
    # The same forward in another batch shape: equal up to float rounding (BLAS blocking varies with the shape and
    # the load), while another request's row or another order would differ by the rows' own scale.
    init = runs["fast"].init
    assert float((runs["batched"].init - init).abs().max() / init.abs().max()) <= 1e-5
    assert float((init[[1, 0, 3, 2]] - init).abs().max() / init.abs().max()) > 1e-2


def test_keys_are_read_at_the_subject_token_of_the_whole_prompt(tok):
    """Prompts are cut after the subject and sorted by length for the key forward; the keys are still those of
    each whole prompt at its subject's last token, in request and context order."""
    model = peaked(tiny_model("llama"))
    spec = arch_for(model)
    contexts = ["{}", "Once upon a time there was a story. {}", "I. {}"]
    requests = [
        EditRequest("0", "{} is a museum in the city of", "The Louvre", "Rome", "Paris"),
        EditRequest("1", "Toko Yasuda plays the {}", "guitar", "Redmond", "piano"),
    ]
    name = spec.path("mlp_out", 1)
    read = read_at_subject(model, tok, spec, requests, contexts, stop_layer=1, inputs_of=[name])[f"in:{name}"]
    for r, req in enumerate(requests):
        for c, context in enumerate(contexts):
            template = context.replace("{}", req.prompt, 1)
            ids = torch.tensor([tok(template.replace("{}", req.subject, 1)).input_ids])
            with capture(model, [name], inputs=True) as rec, torch.no_grad():
                model(input_ids=ids)
            want = rec[name].input[0, subject_last_index(tok, template, req.subject)]
            assert torch.allclose(read[r, c], want, atol=1e-5)


def test_subject_after_a_trailing_space(tok):
    """ "... of " + "Paris": the prefix's trailing space merges into the subject's first token."""
    template = "The Louvre is a museum in {}"
    idx = subject_last_index(tok, template, "Paris")
    assert idx == len(tok("The Louvre is a museum in Paris").input_ids) - 1


# ---- per-layer targets, devices, regularisation, AlphaEdit in the engine -----------------------------------


@pytest.mark.parametrize("mode", ["reference", "batched"])
def test_per_layer_targets_include_the_upstream_shift(tok, mode):
    """Gemma (post-MLP norm): layer i's target is site i's value in the final optimised forward, with δ_<i
    applied upstream, i.e. m_i(δ_<i) + δ_i, not m_i + δ_i."""
    model = peaked(tiny_model("gemma3_text"))
    spec = arch_for(model)
    hp = hp_for("memit", v_mode=mode)
    sites = edit_site(spec, hp)
    assert isinstance(sites, tuple) and len(sites) == 2
    contexts = context_templates(model, tok, seeds=hp.context_seeds, length=hp.context_length)
    values = compute_values(model, tok, spec, REQUESTS, site=sites, layer=0, contexts=contexts, hp=hp)
    for r, req in enumerate(REQUESTS):  # an independent forward with every δ at its site
        ids = torch.tensor([tok(req.rewrite_prompt()).input_ids])
        pos = [subject_last_index(tok, req.prompt, req.subject)]
        with contextlib.ExitStack() as stack:
            for j, name in enumerate(sites):
                stack.enter_context(add_at_positions(model, name, values.delta[r, j], pos))
            rec = stack.enter_context(capture(model, sites))  # registered after the δ hooks: sees m + δ
            with torch.no_grad():
                model(input_ids=ids)
        seen = torch.stack([rec[name].output[0, pos[0]] for name in sites])
        assert torch.allclose(values.targets[r], seen, rtol=1e-4, atol=1e-4 * float(seen.norm(dim=1).max()))
        # The upstream shift is real: layer 1's target is not its unshifted value plus δ_1.
        naive = values.init[r, 1] + values.delta[r, 1]
        assert (values.targets[r, 1] - naive).norm() > 1e-2 * naive.norm()


def test_statistics_move_to_the_keys_device_and_dtype():
    """C0 may sit on the CPU while the model (keys, residuals) is on a GPU in bfloat16: the covariance moves to
    the keys' device once and every solve runs there in float64. Simulated with fake CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastedit.editing.engine import _problem as build_problem

    _, _, c0 = _random_problem()
    hp = EditHparams(method="memit", layers=(0,), clamp_norm_factor=1, v_weight_decay=0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        keys = torch.empty(3, 9, device="cuda", dtype=torch.bfloat16)  # (B, d_k) rows, as the model gives them
        residual = torch.empty(3, 6, device="cuda", dtype=torch.bfloat16)
        cov = EditCovariance(c0.float(), lam=5.0, rel_eps=1e-6, device=keys.device)
        problem = build_problem(cov, hp, residual, keys)
        update = memit_update(problem)
        assert cov.matrix.device.type == "cuda" and cov.matrix.dtype == torch.float64
        assert update.a.device.type == update.b.device.type == "cuda" and update.b.dtype == torch.float64
        one = {"device": "cuda", "dtype": torch.bfloat16}
        one_key, one_residual, bare = torch.empty(1, 9, **one), torch.empty(1, 6, **one), torch.empty(1, 9, **one)
        rome = rome_update(build_problem(cov, hp, one_residual, one_key, bare_keys=bare))
        assert rome.b.device.type == "cuda"


@pytest.mark.parametrize("method", ["memit", "emmet", "alphaedit", "rome"])
def test_edit_in_bfloat16_with_float32_statistics(tok, method):
    """A half-precision model with statistics in another dtype: the edit runs and moves the target."""
    model = peaked(tiny_model("llama"))
    hp = hp_for(method)
    stats = {layer: c.float() for layer, c in key_stats(model, tok, hp.layers).items()}
    model = model.to(torch.bfloat16)
    before = [target_nll(model, tok, r, r.target_new) for r in REQUESTS]
    result = apply_edit(model, tok, REQUESTS, method=method, hparams=hp, stats=stats)
    after = [target_nll(model, tok, r, r.target_new) for r in REQUESTS]
    assert sum(after) < sum(before) - 0.3, (before, after)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in result.deltas.values())


def test_emmet_with_a_rank_deficient_c0_meets_its_constraints(tok):
    """d_m < 1: fewer keys than d_k make C0 singular; the relative ε keeps EMMET's solve exact and finite."""
    model = peaked(tiny_model("llama"))
    hp = hp_for("emmet", mom2_update_weight=100.0)
    spec = arch_for(model)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 10, generator=g, dtype=torch.float64)
    stats = {layer: low @ low.T / 10 for layer in hp.layers}  # rank 10 of 40
    result = apply_edit(model, tok, REQUESTS, method="emmet", hparams=hp, stats=stats)
    for layer in hp.layers:
        assert result.info["layers"][str(layer)]["constraint_residual"] < 1e-4
        assert torch.isfinite(mlp_out_matrix(model, spec, layer)).all()


def test_template_neighbours_keep_the_other_subjects_keys_in_an_edit(tok):
    """The engine reads K_t before editing and hands it to the rule: with a large weight, the edited layer's
    change at the neighbour prompts' keys shrinks, and the run records how many neighbours it preserved."""
    model = peaked(tiny_model("llama"))
    hp = hp_for("memit", layers=(1,), template_neighbours=1)
    stats = key_stats(model, tok, hp.layers)
    kt = template_neighbour_keys(model, tok, arch_for(model), REQUESTS, hp.layers, 1)[1]  # (2, d_k)
    moved = {}
    for weight in (0.0, 1e3):
        result = compute_edit(
            model, tok, REQUESTS, method="memit", hparams=hp.replace(template_neighbours_weight=weight), stats=stats
        )
        a, b = result.deltas[1]
        moved[weight] = float((kt @ b @ a.T).norm())
        assert result.info["template_neighbours"] == (2 if weight else 0)
    assert moved[1e3] < 0.1 * moved[0.0]


def test_template_neighbour_keys_refuse_an_unknown_source(tok):
    """A library caller's misspelt source is an error naming the choices, not a silent fall-back to the batch."""
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="source 'modle' is not one of batch, model"):
        template_neighbour_keys(model, tok, arch_for(model), REQUESTS, (1,), 1, source="modle")


def test_alphaedit_edits_and_keeps_earlier_batches(tok):
    """AlphaEdit through the engine: the edit is non-zero and the second batch's update leaves the first batch's
    keys alone (‖ΔW₂ K₁‖ ≤ 1e-3 ‖W K₁‖)."""
    model = peaked(tiny_model("llama"))
    hp = hp_for("alphaedit", nullspace_threshold=0.5, alphaedit_l2=1e-4)
    spec = arch_for(model)
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 20, generator=g, dtype=torch.float64)
    stats = {layer: low @ low.T / 20 for layer in hp.layers}  # generic keys span 20 of 40 dimensions
    first = apply_edit(model, tok, REQUESTS[:1], method="alphaedit", hparams=hp, stats=stats)
    assert all(float((a @ b.T).norm()) > 0 for a, b in first.deltas.values())
    weights = {layer: mlp_out_matrix(model, spec, layer).detach().clone() for layer in hp.layers}
    second = apply_edit(model, tok, REQUESTS[1:], method="alphaedit", hparams=hp, stats=stats, previous_keys=first.keys)
    for layer, (a, b) in second.deltas.items():
        k_prev = first.keys[layer].T.float()  # (d_k, 1)
        assert float((a @ b.T).norm()) > 0
        assert (a @ (b.T @ k_prev)).norm() <= 1e-3 * (weights[layer] @ k_prev).norm()
