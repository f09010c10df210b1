"""Key statistics on tiny random models: exact counts, C0 against an independent computation, cache, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from fastedit.arch import arch_for
from fastedit.errors import FasteditError
from fastedit.stats import (
    CorpusError,
    KeyStats,
    StatsCacheError,
    StatsError,
    default_layers,
    ensure_stats,
    load_covariance,
    run_stats,
)
from fastedit.stats import precompute as precompute_mod
from fastedit.stats.accumulate import SecondMoment, add_gram
from fastedit.stats.corpus import resolve_corpus
from fastedit.stats.tokens import make_batches, plan_rows

SMALL = {"seq_len": 32, "batch_tokens": 128, "progress": False}


def independent_c0(model, rows: list[torch.Tensor], layer: int) -> torch.Tensor:
    """Σ k kᵀ / N with a plain forward hook, one unpadded row at a time, whole model (no early stop)."""
    keys = []
    module = model.get_submodule(arch_for(model).path("mlp_out", layer))
    handle = module.register_forward_pre_hook(lambda _m, args: keys.append(args[0][0].double()))
    try:
        with torch.no_grad():
            for row in rows:
                model(input_ids=row[None])
    finally:
        handle.remove()
    k = torch.cat(keys)  # (N, d_k)
    return k.T @ k / k.shape[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "gemma3"])
def test_c0_matches_independent_hooks_exact_count(family, tmp_path, text_corpus):
    model, tok = tiny_model(family), tiny_tokenizer()
    d_k = int(arch_for(model).d_k(model.config))
    stats = ensure_stats(model, tok, [0, 2], dm=2.5, corpus=str(text_corpus), out=tmp_path, model_name=family, **SMALL)
    n = 100  # ceil(2.5 · 40): not a multiple of seq_len, so the last row is cut and the last batch padded
    assert d_k == 40
    rows = plan_rows(tok, resolve_corpus(str(text_corpus), model, tok).documents(0), n, 32)
    assert sum(len(r) for r in rows) == n and len(rows[-1]) < 32
    for layer in (0, 2):
        assert stats[layer].count == n
        assert stats[layer].mean.dtype == torch.float64 and stats[layer].mean.shape == (d_k, d_k)
        assert rel(stats[layer].mean, independent_c0(model, rows, layer)) < 1e-6
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_float32_batch_products_agree_with_float64_accumulation():
    """Per-batch kᵀk in float32, summed in float64, against every product in float64: keys at a real model's
    scale (a large shared mean, a few outlier dimensions ~20× the rest), 6,000 rows in batches of 2,048."""
    gen = torch.Generator().manual_seed(0)
    d_k = 192
    keys = torch.randn(d_k, generator=gen) * 3 + 0.5 * torch.randn(6000, d_k, generator=gen)
    keys[:, :4] *= 20
    fast, exact = SecondMoment(d_k, target=5000), SecondMoment(d_k, target=5000, exact=True)
    for batch in keys.split(2048):
        fast.add(batch)
        exact.add(batch)
    assert fast.count == exact.count == 5000  # the target cuts the third batch
    reference = keys[:5000].double().T @ keys[:5000].double()
    assert rel(exact.sum, reference) < 1e-12
    assert rel(fast.sum, reference) < 1e-6
    assert not torch.equal(fast.sum, exact.sum)  # the products really were formed in float32


@pytest.mark.parametrize("block", [7, 20, 64])
def test_upper_triangle_blocks_give_the_full_gram_matrix(block):
    """Blocks that do not divide d (7), one block (20) and a block wider than d: kᵀk accumulated over batches
    from the upper blocks equals the full product, and each lower block is its upper mirror exactly."""
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(300, 20, generator=gen, dtype=torch.float64)
    total = torch.zeros(20, 20, dtype=torch.float64)
    for batch in keys.split(128):
        add_gram(total, batch, block=block)
    assert rel(total, keys.T @ keys) < 1e-14
    assert torch.equal(total[block:, :block], total[:block, block:].T)
    assert rel(total, total.T) < 1e-15


def test_rows_start_with_prefix_and_batches_mask_padding():
    tok = tiny_tokenizer()
    docs = ["The capital of Italy is Rome."] * 20
    rows = plan_rows(tok, iter(docs), 70, 16)
    assert [len(r) for r in rows] == [16, 16, 16, 16, 6]
    batches = make_batches(rows, 48, 16, pad_id=0)
    assert [b.input_ids.shape for b in batches] == [(3, 16), (2, 16)]
    assert batches[1].attention_mask[1].tolist() == [1] * 6 + [0] * 10
    assert sum(b.n_tokens for b in batches) == 70
    assert plan_rows(tok, iter(docs[:1]), None, 16)  # 'full': every token of a short corpus


def test_cache_hit_runs_no_forward_and_names_do_not_collide(tmp_path, text_corpus):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    first = run_stats(model, tok, [1], dm=2, corpus=str(text_corpus), out=tmp_path, model_name="a", **SMALL)
    files = list(tmp_path.glob("*.safetensors"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    second = run_stats(model, tok, [1], dm=2, corpus=str(text_corpus), out=tmp_path, model_name="a", **SMALL)
    handle.remove()
    assert not calls and second.info[1].cached and not first.info[1].cached
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert torch.equal(first.stats[1].mean, second.stats[1].mean)
    meta = second.stats[1].metadata
    for key in ("model", "model_fingerprint", "layer_fingerprint", "module", "d_k", "dtype", "corpus", "seed", "dm"):
        assert meta[key], key
    assert meta["fastedit_version"] and meta["module"] == "model.layers.1.mlp.down_proj"
    # Another model in the same folder gets its own file and its own statistics.
    other = tiny_model("qwen2", seed=3)
    theirs = ensure_stats(other, tok, [1], dm=2, corpus=str(text_corpus), out=tmp_path, model_name="b", **SMALL)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert rel(theirs[1].mean, first.stats[1].mean) > 1e-3


def test_cache_of_another_model_or_width_is_refused(tmp_path, text_corpus):
    tok = tiny_tokenizer()
    ensure_stats(tiny_model("llama"), tok, [0], dm=2, corpus=str(text_corpus), out=tmp_path, model_name="m", **SMALL)
    with pytest.raises(StatsCacheError, match="different model"):
        ensure_stats(
            tiny_model("llama", seed=1), tok, [0], dm=2, corpus=str(text_corpus), out=tmp_path, model_name="m", **SMALL
        )
    wide = tiny_model("llama")
    wide.config.intermediate_size = 48
    wide.model.layers[0].mlp.down_proj = torch.nn.Linear(48, 24, bias=False)
    wide.model.layers[0].mlp.gate_proj = torch.nn.Linear(24, 48, bias=False)
    wide.model.layers[0].mlp.up_proj = torch.nn.Linear(24, 48, bias=False)
    with pytest.raises(StatsCacheError, match="d_k=40"):
        ensure_stats(wide, tok, [0], dm=2, corpus=str(text_corpus), out=tmp_path, model_name="m", **SMALL)


def test_edited_mlp_out_keeps_the_cache_valid(tmp_path, text_corpus):
    """Editors change mlp_out; the key does not depend on it, so the cache must still load."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    ensure_stats(model, tok, [0], dm=2, corpus=str(text_corpus), out=tmp_path, model_name="m", **SMALL)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)
    stats = load_covariance(model, 0, dm=2, corpus=str(text_corpus), out=tmp_path, model_name="m", seq_len=32)
    assert stats.mean.shape == (40, 40)


def test_load_covariance_is_raw_c0_and_needs_cache_or_tokenizer(tmp_path, text_corpus):
    """Raw statistics: the editors apply λ and ε once; KeyStats.covariance shows C = λ·C0 + εI (ε relative)."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    kw = {"dm": 3, "corpus": str(text_corpus), "out": tmp_path, "model_name": "m", "seq_len": 32}
    with pytest.raises(StatsCacheError, match="fastedit precompute"):
        load_covariance(model, 2, **kw)
    stats = load_covariance(model, 2, tokenizer=tok, **kw)
    c0 = ensure_stats(model, tok, [2], **kw)[2].mean
    assert torch.equal(stats.mean, c0)
    eps = 1e-6 * 2.0 * float(c0.diagonal().mean())
    expected = 2.0 * c0 + eps * torch.eye(40, dtype=torch.float64)
    assert torch.allclose(stats.covariance(2.0), expected, rtol=0, atol=1e-12)


def test_keystats_condition_number():
    stats = KeyStats(0, torch.diag(torch.tensor([1.0, 4.0, 100.0], dtype=torch.float64)), 3, {})
    assert stats.condition_number() == pytest.approx(100.0)
    assert stats.condition_number(eps=1.0) == pytest.approx(101 / 2)
    assert KeyStats(0, torch.zeros(2, 2, dtype=torch.float64), 1, {}).condition_number() == float("inf")


def test_dm_full_counts_every_token_and_low_dm_warns(tmp_path, caplog, text_corpus):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    corpus = tmp_path / "c.txt"
    corpus.write_text("Paris is in France.\n\nRome is in Italy.\nBerlin is in Germany.\n")
    stats = ensure_stats(model, tok, [0], dm="full", corpus=str(corpus), out=tmp_path / "o", **SMALL)
    expected = len(tok("Paris is in France.\n\n").input_ids) + len(
        tok("Rome is in Italy.\nBerlin is in Germany.\n\n").input_ids
    )
    assert stats[0].count == expected and stats[0].metadata["dm"] == "full"
    with caplog.at_level(logging.WARNING, logger="fastedit"):
        ensure_stats(model, tok, [0], dm=1, corpus=str(text_corpus), out=tmp_path / "o", **SMALL)
    assert "near-singular" in caplog.text


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "folder"])
def test_structured_corpora(fmt, tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = [f"Fact number {i}: the tower is in Paris and the museum is in Rome." for i in range(30)]
    if fmt == "jsonl":
        path = tmp_path / "c.jsonl"
        path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    elif fmt == "json":
        path = tmp_path / "c.json"
        path.write_text(json.dumps([{"content": t} for t in texts]))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": texts}), path)
    else:
        path = tmp_path / "docs"
        path.mkdir()
        (path / "a.txt").write_text("\n\n".join(texts[:15]))
        (path / "b.md").write_text("\n\n".join(texts[15:]))
        (path / "skip.csv").write_text("not,used")
    stats = ensure_stats(model, tok, [0], dm=2, corpus=str(path), out=tmp_path / "o", **SMALL)
    assert stats[0].count == 80 and stats[0].metadata["corpus_kind"] == "files"


@pytest.mark.parametrize("hub_up", [True, False])
def test_default_corpus_is_the_wikitext_data_set_online_and_offline(tmp_path, monkeypatch, text_corpus, hub_up):
    import fastedit.models
    from fastedit.data import add_dataset

    monkeypatch.setattr(fastedit.models, "_hub_reachable", lambda *a, **k: hub_up)  # never consulted
    monkeypatch.setenv("FASTEDIT_DATA", str(tmp_path / "data"))
    add_dataset("wikitext-2", text_corpus)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    default = ensure_stats(model, tok, [0], dm=2, out=tmp_path / "a", **SMALL)[0]
    by_name = ensure_stats(model, tok, [0], dm=2, corpus="wikitext-2", out=tmp_path / "b", **SMALL)[0]
    explicit = ensure_stats(model, tok, [0], dm=2, corpus=str(text_corpus), out=tmp_path / "c", **SMALL)[0]
    assert default.metadata["corpus"] == by_name.metadata["corpus"]  # file:wiki.test.raw:<content hash>
    assert torch.equal(default.mean, explicit.mean) and torch.equal(by_name.mean, explicit.mean)


def test_missing_data_set_corpus_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEDIT_DATA", str(tmp_path / "empty"))
    with pytest.raises(FasteditError, match=r"data set 'wikitext-2' is not in .*fastedit data add wikitext-2 FILE"):
        ensure_stats(tiny_model("llama"), tiny_tokenizer(), [0], dm=2, corpus="wikitext-2", out=tmp_path, **SMALL)


@pytest.mark.parametrize("hub_up", [True, False])
def test_without_data_the_default_corpus_is_model_text_seeded_and_recorded(tmp_path, caplog, monkeypatch, hub_up):
    import fastedit.models

    monkeypatch.setattr(fastedit.models, "_hub_reachable", lambda *a, **k: hub_up)  # the same either way
    monkeypatch.setenv("FASTEDIT_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("FASTEDIT_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with caplog.at_level(logging.INFO, logger="fastedit"):
        a = ensure_stats(model, tok, [0], dm=2, out=tmp_path / "a", **SMALL)[0]
    assert "sampling text from the model" in caplog.text
    assert a.metadata["corpus_kind"] == "model" and a.metadata["corpus"].startswith("model-sampled")
    assert a.count == 80 and a.metadata["seq_len"] == "32"
    b = ensure_stats(model, tok, [0], dm=2, out=tmp_path / "b", **SMALL)[0]
    assert torch.equal(a.mean, b.mean)
    c = ensure_stats(model, tok, [0], dm=2, seed=1, out=tmp_path / "c", **SMALL)[0]
    assert not torch.equal(a.mean, c.mean)


def test_resume_continues_an_interrupted_run(tmp_path, monkeypatch, text_corpus):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    kw = {"dm": 8, "corpus": str(text_corpus), "model_name": "m", **SMALL, "batch_tokens": 32}  # 10 batches of 32
    reference = ensure_stats(model, tok, [0, 1], out=tmp_path / "ref", **kw)
    monkeypatch.setattr(precompute_mod, "CHECKPOINT_SECONDS", 0.0)
    calls = []

    def interrupt(*_):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        ensure_stats(model, tok, [0, 1], out=tmp_path / "run", **kw)
    assert sorted(p.name.split(".")[-2] for p in (tmp_path / "run").glob("*.safetensors")) == ["partial", "partial"]
    calls.clear()
    resumed = ensure_stats(model, tok, [0, 1], out=tmp_path / "run", resume=True, **kw)
    handle.remove()
    assert len(calls) == 4  # batches 7..10 only
    assert not list((tmp_path / "run").glob("*.partial.safetensors"))
    for layer in (0, 1):
        assert resumed[layer].count == 320
        assert rel(resumed[layer].mean, reference[layer].mean) < 1e-12


def test_default_layers_from_hparams_file_else_reference(tmp_path, monkeypatch):
    model = tiny_model("llama")
    spec = arch_for(model)
    folder = tmp_path / "hparams" / "memit"
    monkeypatch.setattr("fastedit.stats.layers.hparams_dirs", lambda: [folder])
    layers, source = default_layers(model, spec, "tiny")
    assert layers == [0, 1, 2] and "generic" in source  # 3 layers: the Llama 4-8 reference does not fit
    folder.mkdir(parents=True)
    (folder / "llama.json").write_text(json.dumps({"layers": [4, 5, 6, 7, 8]}))
    assert default_layers(model, spec, "tiny")[0] == [0, 1, 2]  # beyond the depth: ignored
    (folder / "tiny.json").write_text(json.dumps({"layers": [1, 2], "lr": 0.5}))  # the model's own file first
    assert default_layers(model, spec, "tiny") == ([1, 2], str(folder / "tiny.json"))
    # Every method's file for that model counts: one precompute serves each editor.
    (tmp_path / "hparams" / "emmet").mkdir()
    (tmp_path / "hparams" / "emmet" / "tiny.json").write_text(json.dumps({"layers": [0, 1]}))
    layers, source = default_layers(model, spec, "tiny")
    assert layers == [0, 1, 2] and "memit" in source and "emmet" in source


# ---- bad input: a clear error and nothing written ----------------------------------------------------------


def _no_files(folder) -> bool:
    return not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dm": 0}, StatsError, "d_m must be > 0"),
        ({"dm": -2}, StatsError, "d_m must be > 0"),
        ({"dm": "lots"}, StatsError, "positive number or 'full'"),
        ({"layers": [3]}, StatsError, r"out of range: the model has 3 layers"),
        ({"layers": []}, StatsError, "no layers"),
        ({"corpus": "EMPTY"}, CorpusError, "contains no text"),
        ({"corpus": "SHORT"}, CorpusError, r"has only \d+ tokens .* supports d_m <= 0\.\d+"),
        ({"corpus": "CSV"}, CorpusError, "unknown corpus format '.csv'"),
        ({"corpus": "MISSING"}, CorpusError, "does not exist"),
        ({"out": "FILE/sub"}, StatsError, "cannot write statistics"),
    ],
)
def test_bad_input(kwargs, error, match, tmp_path, text_corpus):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "short.txt").write_text("Paris is in France.")
    (tmp_path / "c.csv").write_text("a,b")
    (tmp_path / "file").write_text("x")
    names = {
        "EMPTY": tmp_path / "empty.txt",
        "SHORT": tmp_path / "short.txt",
        "CSV": tmp_path / "c.csv",
        "MISSING": tmp_path / "nope.txt",
        "FILE/sub": tmp_path / "file" / "sub",
    }
    args = {"layers": [0], "dm": 2, "corpus": str(text_corpus), "out": tmp_path / "out", **kwargs}
    for key in ("corpus", "out"):
        args[key] = str(names.get(str(args[key]), args[key]))
    with pytest.raises(error, match=match):
        ensure_stats(model, tok, args.pop("layers"), **args, **SMALL)
    assert _no_files(tmp_path / "out")


def test_nan_activations_name_the_layer(tmp_path, text_corpus):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(StatsError, match=r"non-finite \(NaN/Inf\) keys at layer 1"):
        ensure_stats(model, tok, [0, 1], dm=2, corpus=str(text_corpus), out=tmp_path, **SMALL)
    assert _no_files(tmp_path)


def test_hub_dataset_name_offline_is_a_clear_error(tmp_path, monkeypatch):
    import fastedit.models

    monkeypatch.setattr(fastedit.models, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(CorpusError, match="hub is unreachable"):
        ensure_stats(tiny_model("llama"), tiny_tokenizer(), [0], corpus="wikitext:wikitext-103-raw-v1", out=tmp_path)


def test_seq_len_is_clipped_to_the_models_positions(tmp_path):
    """A default seq_len longer than a short-context model's positions is clipped instead of crashing."""
    model = tiny_model("gpt2")
    model.config.n_positions = 32
    corpus = tmp_path / "c.txt"
    corpus.write_text(("The Eiffel Tower is located in Paris. Michael Jordan plays basketball.\n\n") * 200)
    stats = ensure_stats(model, tiny_tokenizer(), [1], dm=2, corpus=str(corpus), out=tmp_path / "o", seq_len=256)
    assert stats[1].count == 2 * 40
    assert stats[1].metadata["seq_len"] == "32"
