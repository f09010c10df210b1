"""SAE module: architectures, training, SAELens layout, activation capture/buffer, metrics, question sets, MC."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import TEXT, tiny_model, tiny_tokenizer

from fastedit.arch import arch_for, capture
from fastedit.errors import FasteditError
from fastedit.sae.activations import ShufflingBuffer, cached_activations, load_activations, stream_activations
from fastedit.sae.io import SAEFormatError, SAEInfo, load_sae, save_sae
from fastedit.sae.metrics import ce_recovered, reconstruction_metrics
from fastedit.sae.model import ARCHS, SAE, SAEConfig
from fastedit.sae.questions import (
    accuracy_flags,
    build_question_sets,
    mc_accuracy,
    mc_prompt,
    read_counterfact,
    read_multiple_choice,
    topic_of,
)
from fastedit.sae.train import TrainConfig, Trainer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids oversubscription stalls on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sparse_data(n: int = 6000, d: int = 16, atoms: int = 48, active: int = 3, seed: int = 0) -> torch.Tensor:
    """x = Σ of `active` random unit atoms with positive weights, plus an offset: a known sparse dictionary."""
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(atoms, d, generator=g)
    dic /= dic.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(atoms, generator=g)[:active] for _ in range(n)])
    w = torch.rand(n, active, generator=g) * 2 + 0.5
    return (w[..., None] * dic[idx]).sum(1) * 30 + 5.0


def _train(arch: str, data: torch.Tensor, steps: int = 200, **kw) -> Trainer:
    kw = {"n_clusters": 4, "rank": 16, **kw}
    cfg = TrainConfig(arch=arch, width=64, k=4, batch_size=256, lr=3e-3, dead_window=50, **kw)
    trainer = Trainer(cfg, data.shape[1], data[:1000], steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        trainer.train_step(data[torch.randint(len(data), (256,), generator=g)], data[:64] if arch != "topk" else None)
    trainer.finish()
    return trainer


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_learns_a_sparse_dictionary(arch):
    data = _sparse_data()
    trainer = _train(arch, data)
    m = reconstruction_metrics(trainer.sae, data[:2000])
    # The factor SAE's encoder is low-rank per cluster and slower to fit in 200 steps.
    assert m["explained_variance"] > (0.65 if arch == "factor" else 0.8), m
    assert m["l0"] <= (24 if arch == "relu" else 4.01)


def test_l1_buys_sparsity():
    data = _sparse_data()
    l0 = [reconstruction_metrics(_train("relu", data, l1=l1).sae, data[:2000])["l0"] for l1 in (0.04, 0.4)]
    assert l0[1] < 0.7 * l0[0]


def test_relu_decoder_rows_stay_unit_norm():
    trainer = _train("relu", _sparse_data(), steps=50)
    norms = trainer.sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_factor_reorthogonalisation_keeps_the_decoder():
    trainer = _train("factor", _sparse_data(), steps=10, reorth_every=1000)
    before = trainer.sae.decoder().clone()
    trainer.step = 0
    trainer._after_factor()
    v = trainer.sae.V_dec
    assert torch.allclose(trainer.sae.decoder(), before, atol=1e-4)
    assert torch.allclose(v.transpose(1, 2) @ v, torch.eye(v.shape[-1]).expand_as(v.transpose(1, 2) @ v), atol=1e-5)


def test_hiercontrastive_prunes_five_percent():
    trainer = _train("hiercontrastive", _sparse_data(), steps=60)
    assert int((trainer.sae.alive == 0).sum()) == int(0.05 * 64)
    assert not (trainer.sae.encode(_sparse_data()[:500])[:, trainer.sae.alive == 0] > 0).any()


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_layout_round_trip(tmp_path, arch):
    trainer = _train(arch, _sparse_data(), steps=60)
    sae, x = trainer.sae.eval(), _sparse_data()[:300]
    info = SAEInfo(model_name="m", layer=2, site="resid_post")
    stats = trainer.stats()
    save_sae(sae, info, tmp_path / arch, stats["sparsity"], {"attribution": stats["attribution"]})
    assert {p.name for p in (tmp_path / arch).iterdir()} == {
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "fastedit_state.safetensors",
    }
    loaded, linfo = load_sae(tmp_path / arch)
    assert linfo.layer == 2 and linfo.hook_name == "blocks.2.hook_resid_post"
    assert torch.allclose(loaded(x)[0], sae(x)[0], rtol=1e-4, atol=1e-3)
    # A plain SAELens reader sees the folded W_enc/W_dec/b_enc/b_dec: same output for relu / topk.
    if arch in ("relu", "topk"):
        (tmp_path / arch / "fastedit_state.safetensors").unlink()
        plain, _ = load_sae(tmp_path / arch)
        assert plain.scale == 1.0
        assert torch.allclose(plain(x)[0], sae(x)[0], rtol=1e-4, atol=1e-3)


def test_load_saelens_new_layout_and_jumprelu(tmp_path):
    from safetensors.torch import save_file

    d_in, d_sae = 6, 10
    w = {
        "W_enc": torch.randn(d_in, d_sae),
        "W_dec": torch.randn(d_sae, d_in),
        "b_enc": torch.zeros(d_sae),
        "b_dec": torch.zeros(d_in),
        "threshold": torch.full((d_sae,), 0.5),
    }
    save_file(w, tmp_path / "sae_weights.safetensors")
    meta = {"hook_name": "blocks.4.hook_mlp_out", "model_name": "gemma-2-2b"}
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": d_in, "metadata": meta}))
    sae, info = load_sae(tmp_path)
    assert (info.layer, info.site, info.model_name) == (4, "mlp_out", "gemma-2-2b")
    x = torch.randn(5, d_in)
    pre = x @ w["W_enc"]
    assert torch.allclose(sae.encode(x), pre * (pre > 0.5))


def test_bad_sae_folders_are_clear_errors(tmp_path):
    with pytest.raises(SAEFormatError, match=r"missing cfg\.json"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"hook_name": "blocks.1.hook_resid_post", "architecture": "gated"}))
    from safetensors.torch import save_file

    save_file({"W_enc": torch.zeros(2, 3)}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(SAEFormatError, match="unknown SAE layout"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"hook_name": "blocks.1.hook_attn_out", "architecture": "standard"}))
    with pytest.raises(SAEFormatError, match="hook_name"):
        load_sae(tmp_path)


# ---- activations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_stream_matches_hidden_states(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    acts = torch.cat(list(stream_activations(model, tok, TEXT, 1, context=16, max_tokens=64, progress=False)))
    windows = __import__("fastedit.sae.activations", fromlist=["x"]).token_windows(tok, TEXT, 16, 64)[0]
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states[2]  # after block 1
    assert acts.shape == (windows.numel(), 24)
    assert torch.allclose(acts, hidden.reshape(-1, 24), atol=1e-5)


def test_mlp_out_site_and_bad_layer():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    acts = next(stream_activations(model, tok, TEXT, 0, site="mlp_out", context=16, max_tokens=32, progress=False))
    name = arch_for(model).path("mlp", 0)
    ids = __import__("fastedit.sae.activations", fromlist=["x"]).token_windows(tok, TEXT, 16, 32)[0]
    with capture(model, [name]) as rec:
        model(input_ids=ids[:8])
    assert torch.allclose(acts, rec[name].output.reshape(-1, 24)[: len(acts)], atol=1e-6)
    with pytest.raises(FasteditError, match="layer 7 out of range"):
        next(stream_activations(model, tok, TEXT, 7, progress=False))


def test_activation_cache_is_written_once(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    p1 = cached_activations(model, tok, TEXT, 1, context=16, tokens=64, folder=tmp_path)
    mtime = p1.stat().st_mtime_ns
    p2 = cached_activations(model, tok, TEXT, 1, context=16, tokens=64, folder=tmp_path)
    assert p1 == p2 and p2.stat().st_mtime_ns == mtime
    assert load_activations(p1).shape == (64, 24)
    assert cached_activations(model, tok, TEXT, 2, context=16, tokens=64, folder=tmp_path) != p1


def test_shuffling_buffer_is_a_permutation_per_epoch():
    data = torch.arange(1000.0)[:, None]
    buf = ShufflingBuffer(lambda: iter(data.split(37)), size=300, batch_size=10)
    rows = torch.cat(list(buf.batches(epochs=1))).flatten()
    assert len(rows) >= 990 and len(set(rows.tolist())) == len(rows)
    assert not torch.equal(rows, torch.sort(rows).values)  # mixed, not in stream order


# ---- metrics ---------------------------------------------------------------------------------------------------


def _identity_sae(d: int) -> SAE:
    """ReLU SAE with features +e_j and −e_j: reconstructs exactly."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, arch="relu", activation="relu"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_dec.zero_()
    return sae.requires_grad_(False)


def test_sae_runs_on_activations_of_another_device_and_dtype():
    """A float32 SAE on the CPU under a bfloat16 model on a GPU (fake CUDA tensors): computed on the SAE's device,
    the reconstruction handed back on the model's device and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    sae = _identity_sae(24)
    with FakeTensorMode(allow_non_fake_inputs=True):
        h = torch.empty(2, 5, 24, device="cuda", dtype=torch.bfloat16)
        x_hat, z = sae.on_activations(h)
        assert x_hat.device.type == "cuda" and x_hat.dtype == torch.bfloat16 and x_hat.shape == h.shape
        assert z.device.type == "cpu" and z.dtype == torch.float32
    x = torch.randn(3, 24, dtype=torch.float64)
    assert torch.allclose(sae.on_activations(x)[0], x, atol=1e-6)  # exact SAE: x back, in x's dtype


def test_ce_recovered_is_one_for_an_exact_sae_and_low_for_a_bad_one():
    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    exact = ce_recovered(model, tok, _identity_sae(24), TEXT, 1, context=16, n_windows=2)
    assert exact["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    bad = _identity_sae(24)
    bad.W_dec.mul_(-1)
    assert ce_recovered(model, tok, bad, TEXT, 1, context=16, n_windows=2)["ce_recovered"] < 0.9
    acts = torch.randn(100, 24)
    m = reconstruction_metrics(_identity_sae(24), acts)
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < m["l0"] <= 24


# ---- question sets and multiple choice -------------------------------------------------------------------------


def test_topics_from_relation_wording(counterfact):
    assert topic_of("The mother tongue of Danielle Darrieux is", "Danielle Darrieux") == "languages"
    assert topic_of("Toko Yasuda plays the", "Toko Yasuda") == "sports_music"
    assert topic_of("iPhone, developed by", "iPhone") == "companies"
    assert topic_of("The twin city of Tirana is", "Tirana") == "places"
    qs = read_counterfact(counterfact)
    assert len(qs) == 10_000 and qs[0].true == "French" and qs[0].new == "English"


def test_known_questions_use_the_two_way_test(counterfact):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    qs = read_counterfact(counterfact)[:6]
    known, top1 = accuracy_flags(model, tok, qs)
    swapped = [q.__class__(**{**q.__dict__, "true": q.new, "new": q.true}) for q in qs]
    known_swapped, _ = accuracy_flags(model, tok, swapped)
    assert torch.equal(known, ~known_swapped)  # exactly one of the two targets wins
    assert top1.dtype == torch.bool


def test_too_few_known_forget_questions_says_how_many(counterfact):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(FasteditError, match=r"has only \d+ known questions"):
        build_question_sets(model, tok, "languages", counterfact=counterfact, candidates_per_topic=5, min_forget=20)
    with pytest.raises(FasteditError, match="unknown forget topic"):
        build_question_sets(model, tok, "astrology", counterfact=counterfact, candidates_per_topic=2)


def test_multiple_choice_files_and_four_letter_scoring(tmp_path):
    rows = [
        {"question": "Which is a city?", "choices": ["Paris", "Blue", "Seven", "Run"], "answer": 0},
        {"question": "Capital of Italy?", "choices": ["Oslo", "Rome", "Lima", "Kyiv"], "answer": "B"},
        {"question": "Which plays guitar?", "choices": ["a", "b", "c", "Toko"], "answer": 3},
    ]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    as_ints = [{**r, "answer": a} for r, a in zip(rows, (0, 1, 3), strict=True)]
    pq.write_table(pa.Table.from_pylist(as_ints), tmp_path / "mc.parquet")
    a, b = read_multiple_choice(tmp_path / "mc.jsonl"), read_multiple_choice(tmp_path / "mc.parquet")
    assert [r["answer"] for r in a] == [0, 1, 3] == [r["answer"] for r in b]
    model, tok = tiny_model("llama"), tiny_tokenizer()
    res = mc_accuracy(model, tok, a, batch_size=2)
    # The same decision by hand for each row: argmax of the four letter logits at the end of the prompt.
    letters = [tok(" " + c, add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    for r, ok in zip(a, res["correct"], strict=True):
        ids = tok(mc_prompt(r["question"], r["choices"]), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            pred = int(model(input_ids=ids).logits[0, -1, letters].argmax())
        assert ok == (pred == r["answer"])
    assert res["n"] == 3 and res["accuracy"] == sum(res["correct"]) / 3
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}))
    with pytest.raises(FasteditError, match="four 'choices'"):
        read_multiple_choice(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("arch", ["featureforget", "hiercontrastive"])
def test_variants_train_with_a_forget_topic(tmp_path, arch, counterfact):
    from fastedit.sae.api import train_sae
    from fastedit.sae.io import load_sparsity

    model, tok = tiny_model("llama"), tiny_tokenizer()
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 20)
    res = train_sae(
        model, 1, tmp_path / arch, tokenizer=tok, arch=arch, width=32, tokens=1500, corpus=corpus, k=4,
        batch_size=128, epochs=4, buffer_size=512, n_clusters=4, forget_topic="languages", counterfact=counterfact,
        eval_tokens=300, ce_windows=0, activation_cache=tmp_path / "acts",
    )  # fmt: skip
    assert res["train"]["final"]["forget_fvu"] < 1.0  # phase 2 ran the dual objective on forget text
    stats = load_sparsity(tmp_path / arch)
    assert stats["cluster"].max() <= 3 and stats["forget_activity"].sum() > 0
    sae, _ = load_sae(tmp_path / arch)
    assert sae.cfg.arch == arch
