"""Unlearning comparison: the clamp hook's arithmetic, the full run on a tiny model, the CLI commands."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import TEXT, tiny_model, tiny_tokenizer

from fastedit.arch import arch_for, capture
from fastedit.cli import cli
from fastedit.errors import FasteditError
from fastedit.sae.io import SAEInfo, save_sae
from fastedit.sae.model import SAE, SAEConfig
from fastedit.sae.unlearn import UnlearnConfig, _Mask, clamp_features, run_unlearning


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_sae(d_in: int = 24, width: int = 32, k: int = 6, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=width, arch="topk", activation="topk", k=k))
    return sae.eval().requires_grad_(False)


def test_clamp_sets_active_features_and_keeps_the_error():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sae, info = _random_sae(), SAEInfo(model_name="tiny", layer=1)
    name = arch_for(model).path("block", 1)
    ids = tok("The capital of Italy is Rome", return_tensors="pt")["input_ids"]
    with capture(model, [name]) as rec:
        model(input_ids=ids)
    x = rec[name].output
    z = sae.encode(x)
    feats = torch.tensor([0, 3, 5])
    values = torch.tensor([25.0, 50.0, 100.0])
    with clamp_features(model, sae, info, feats, values, _Mask()), capture(model, [name]) as rec2:
        model(input_ids=ids)
    zf = z[..., feats]
    expected = x + torch.where(zf > 0, -values - zf, torch.zeros_like(zf)) @ (sae.decoder()[feats] * sae.scale)
    assert (zf > 0).any()
    assert torch.allclose(rec2[name].output, expected, atol=1e-4)
    # In SAE space: the clamped features read −value where they were active, the error term is unchanged.
    new = rec2[name].output
    err_before = x - sae.decode(z)
    z_new = z.clone()
    z_new[..., feats] = torch.where(zf > 0, -values, zf)
    assert torch.allclose(new, sae.decode(z_new) + err_before, atol=1e-3)


def test_clamping_silent_features_changes_nothing():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sae = _random_sae()
    sae.b_enc.fill_(-1e4)  # nothing ever fires
    ids = tok(TEXT[:80], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with clamp_features(
            model, sae, SAEInfo("tiny", 1), torch.tensor([1, 2]), torch.tensor([200.0, 200.0]), _Mask()
        ):
            after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def _small_cfg(tmp_path, counterfact, **kw) -> UnlearnConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 20)
    base = {
        "forget_topic": "languages",
        "candidates_per_topic": 16,
        "max_forget": 8,
        "retain_per_topic": 2,
        "min_forget": 2,
        "retain_corpus_tokens": 600,
        "multipliers": [25.0, 200.0],
        "norm_scales": [1.0],
        "counterfact": str(counterfact),
        "corpus": str(corpus),
    }
    return UnlearnConfig(**{**base, **kw})


def test_run_unlearning_writes_table_plot_and_every_row(tmp_path, monkeypatch, counterfact):
    monkeypatch.setenv("FASTEDIT_CACHE_DIR", str(tmp_path / "cache"))  # the editors' statistics land here
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sae = _random_sae(k=12)
    save_sae(sae, SAEInfo("tiny", 1), tmp_path / "sae", torch.zeros(32))
    editor_hparams = {}
    for method in ("memit", "emmet"):  # the family's files edit layers 4-8; the tiny model has 3 layers
        hp = {"method": method, "layers": [1, 2], "clamp_norm_factor": 4, "v_weight_decay": 1e-3, "v_lr": 0.5}
        (tmp_path / f"{method}.json").write_text(json.dumps(hp))
        editor_hparams[method] = str(tmp_path / f"{method}.json")
    run_unlearning(
        model,
        [tmp_path / "sae", tmp_path / "sae"],
        tmp_path / "out",
        tokenizer=tok,
        config=_small_cfg(tmp_path, counterfact, editor_hparams=editor_hparams),
    )
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"unlearning.json", "unlearning.png", "table.md"}
    saved = json.loads((tmp_path / "out" / "unlearning.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["topk", "topk-1", "memit", "emmet"]
    for row in saved["rows"][:2]:
        assert 0.0 <= row["score"] <= 1.0 and row["note"]
        assert row["score"] == pytest.approx(1 - row["forget_acc"]) or "no clamp configuration" in row["note"]
    for row in saved["rows"][2:]:  # editors: scored by the same scorer, on the same questions
        assert row["score"] is not None and 0.0 <= row["forget_acc"] <= 1.0, row["note"]
    # EMMET's llama hparams ask for the same v* targets as MEMIT's: one optimisation serves both rows
    assert "shared" not in saved["rows"][2]["note"] and "shared with an earlier row" in saved["rows"][3]["note"]
    grid = saved["grids"]["topk"]
    assert {g.get("grid") for g in grid if "grid" in g} <= {"absolute", "norm-scaled"}
    assert all(g["retain_acc"] <= 1.0 for g in grid if "retain_acc" in g)
    assert saved["baseline"] == {"retain": 1.0, "forget": 1.0}  # only known questions are kept
    assert "forget topic languages" in saved["split"] and saved["topics"]["languages"]["used"] == len(
        saved["forget_questions"]
    )
    assert (tmp_path / "out" / "unlearning.png").read_bytes()[:4] == b"\x89PNG"


def test_sae_of_another_width_fails_before_any_work(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    save_sae(_random_sae(d_in=16), SAEInfo("tiny", 1), tmp_path / "sae", torch.zeros(32))
    (tmp_path / "cf.json").write_text("[]")  # must exist (checked before the model loads), never parsed here
    cfg = _small_cfg(tmp_path, tmp_path / "cf.json")
    with pytest.raises(FasteditError, match="d_in 16 does not match"):
        run_unlearning(model, [tmp_path / "sae"], tmp_path / "out", tokenizer=tok, config=cfg)
    assert not (tmp_path / "out").exists()


def test_cli_sae_train_eval_and_unlearn(tmp_path, monkeypatch, counterfact):
    monkeypatch.setenv("FASTEDIT_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 30)
    runner = CliRunner()
    common = ["--model", str(tmp_path / "model"), "--layer", "1", "--width", "32", "--tokens", "1500"]
    res = runner.invoke(
        cli,
        ["sae", "train", *common, "--arch", "topk", "--k", "4", "--corpus", str(corpus), "--out", str(tmp_path / "s")],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["l0"] == pytest.approx(4.0) and -1 < out["explained_variance"] <= 1
    assert {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"} <= {
        p.name for p in (tmp_path / "s").iterdir()
    }
    res = runner.invoke(cli, ["sae", "eval", str(tmp_path / "s"), "--corpus", str(corpus), "--tokens", "500"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["hook"] == "blocks.1.hook_resid_post"
    res = runner.invoke(cli, ["sae", "eval", str(tmp_path)])
    assert res.exit_code == 1 and res.output.startswith("error:") and "SAELens layout" in res.output
    args = ["unlearn", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "s"), "--editors", ""]
    args += ["--candidates", "60", "--max-forget", "20", "--retain-per-topic", "2", "--corpus", str(corpus)]
    args += ["--counterfact", str(counterfact), "--out", str(tmp_path / "u")]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "| topk |" in res.stdout and (tmp_path / "u" / "unlearning.png").exists()


@pytest.mark.parametrize("skip", [True, False])
def test_stronger_clamps_after_a_failed_gate_are_skipped_only_when_asked(tmp_path, skip, counterfact):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    save_sae(_random_sae(k=12), SAEInfo("tiny", 1), tmp_path / "sae", torch.zeros(32))
    cfg = _small_cfg(
        tmp_path,
        counterfact,
        retain_thresholds=[1.01],  # every feature qualifies (a random TopK SAE fires everywhere)
        multipliers=[1e5, 2e5, 4e5],
        norm_scales=[],
        editors=[],
        skip_stronger_after_fail=skip,
    )
    saved = run_unlearning(model, [tmp_path / "sae"], tmp_path / "out", tokenizer=tok, config=cfg)
    grid = [g for g in saved["grids"]["topk"] if "grid" in g and not g.get("duplicate")]
    weakest = [g for g in grid if g["multiplier"] == 1e5]
    assert weakest and all(not g["kept"] for g in weakest)  # a 1e5 clamp wrecks the retain answers
    stronger = [g for g in grid if g["multiplier"] > 1e5]
    if skip:
        assert stronger and all("skipped" in g and "retain_acc" not in g for g in stronger)
    else:
        assert stronger and all("retain_acc" in g for g in stronger)
