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
from fastedit.sae.questions import accuracy_flags, build_question_sets, make_probe, score_probes
from fastedit.sae.unlearn import (
    OUTPUTS,
    RetainGate,
    Scorer,
    UnlearnConfig,
    _Mask,
    _request,
    clamp_features,
    edit_row,
    run_unlearning,
)


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
        "candidates_per_topic": 24,
        "max_forget": 8,
        "retain_questions": 14,
        "min_forget": 2,
        "retain_corpus_tokens": 600,
        "multipliers": [25.0, 200.0],
        "norm_scales": [1.0],
        "counterfact": str(counterfact),
        "corpus": str(corpus),
    }
    return UnlearnConfig(**{**base, **kw})


def _editor_hparams(tmp_path) -> dict[str, str]:
    files = {}
    for method in ("memit", "emmet"):  # the family's files edit layers 4-8; the tiny model has 3 layers
        hp = {"method": method, "layers": [1, 2], "clamp_norm_factor": 4, "v_weight_decay": 1e-3, "v_lr": 0.5}
        (tmp_path / f"{method}.json").write_text(json.dumps(hp))
        files[method] = str(tmp_path / f"{method}.json")
    return files


def test_run_unlearning_writes_table_plot_every_grid_point_and_the_split(tmp_path, monkeypatch, counterfact):
    monkeypatch.setenv("FASTEDIT_CACHE_DIR", str(tmp_path / "cache"))  # the editors' statistics land here
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sae = _random_sae(k=12)
    save_sae(sae, SAEInfo("tiny", 1), tmp_path / "sae", torch.zeros(32))
    cfg = _small_cfg(
        tmp_path,
        counterfact,
        editor_hparams=_editor_hparams(tmp_path),
        retain_max_drop=0.3,  # 4 of 14 answers may flip
        retain_thresholds=[0.001, 1.01],  # a random TopK SAE fires everywhere: only 1.01 leaves features
        n_features=[1, 20],
        multipliers=[0.002, 0.02, 0.2],  # the tiny model's residual norm is ~0.1
        norm_scales=[0.05, 2.0],
        batch_size=4,  # several retain batches, so scoring can stop early
    )
    run_unlearning(model, [tmp_path / "sae", tmp_path / "sae"], tmp_path / "out", tokenizer=tok, config=cfg)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == set(OUTPUTS)
    saved = json.loads((tmp_path / "out" / "unlearning.json").read_text())
    assert saved["config"]["retain_max_drop"] == 0.3 and saved["config"]["retain_questions"] == 14
    assert [r["method"] for r in saved["rows"]] == ["topk", "topk-1", "memit", "emmet"]
    for row in saved["rows"][:2]:
        assert 0.0 <= row["score"] <= 1.0 and row["note"]
        assert row["score"] == pytest.approx(1 - row["forget_acc"]) or "no clamp configuration" in row["note"]
    for row in saved["rows"][2:]:  # editors: scored by the same scorer, on the same questions
        assert row["score"] is not None and 0.0 <= row["forget_acc"] <= 1.0, row["note"]
        assert 0.0 <= row["forget_acc_installed"] <= 1.0
    # EMMET's llama hparams ask for the same v* targets as MEMIT's: one optimisation serves both rows
    assert "shared" not in saved["rows"][2]["note"] and "shared with an earlier row" in saved["rows"][3]["note"]
    # The split: case ids of both sets, disjoint, the forget topic only in the forget set.
    split = saved["split"]
    assert split["forget_case_ids"] == [q["case_id"] for q in saved["forget_questions"]]
    assert split["retain_case_ids"] == [q["case_id"] for q in saved["retain_questions"]]
    assert len(split["retain_case_ids"]) == 14 and not set(split["forget_case_ids"]) & set(split["retain_case_ids"])
    assert all(q["rephrase"] and q["topic"] == "languages" for q in saved["forget_questions"])
    assert all(q["topic"] != "languages" for q in saved["retain_questions"])
    assert saved["topics"]["languages"]["used"] == len(split["forget_case_ids"])
    # Every grid point of every SAE: (threshold, n) × (absolute multipliers + norm scales), or one note per (t, n).
    for name in ("topk", "topk-1"):
        grid = saved["grids"][name]
        points = {(g["retain_threshold"], g["n"], g.get("grid"), g.get("multiplier")) for g in grid}
        for t in cfg.retain_thresholds:
            for n in cfg.n_features:
                scales = [("absolute", m) for m in cfg.multipliers] + [("norm-scaled", m) for m in cfg.norm_scales]
                assert all((t, n, *sc) in points for sc in scales) or (t, n, None, None) in points
    # The gate in the JSON is the configured one, and every scored grid point obeys it.
    assert saved["gate"] == {"retain_questions": 14, "max_drop": 0.3, "max_flipped": 4, "min_retain_acc": 10 / 14}
    scored = [g for g in saved["grids"]["topk"] if "retain_flipped" in g]
    assert any(g["kept"] and g["retain_flipped"] > 0 for g in scored) and any(not g["kept"] for g in scored)
    for g in scored:
        assert g["kept"] == (g["retain_flipped"] <= 4)
        assert ("forget_acc" in g) == g["kept"]
        if g.get("retain_scored") is not None:  # stopped early: only once the gate had failed
            assert g["retain_flipped"] > 4 and g["retain_acc"] is None
        else:
            assert g["retain_acc"] == pytest.approx(1 - g["retain_flipped"] / 14)
    assert saved["baseline"] == {"retain": 1.0, "forget": 1.0, "forget_installed": 1.0}
    table = (tmp_path / "out" / "table.md").read_text()
    assert "held-out paraphrase" in table and "installed prompt" in table and "at most 4 of 14" in table
    assert (tmp_path / "out" / "unlearning.png").read_bytes()[:4] == b"\x89PNG"


def test_editor_rows_are_scored_on_held_out_paraphrases(tmp_path, monkeypatch, counterfact):
    """The editor sees the rewrite prompt only; its forget accuracy is the paraphrases', recomputed here by
    installing the same edit independently (a model with peaked weights, so the edit takes)."""
    from test_editing_core import peaked

    from fastedit.editing.engine import apply_edit
    from fastedit.editing.hparams import load_hparams
    from fastedit.requests import EditRequest
    from fastedit.stats import ensure_stats

    monkeypatch.setenv("FASTEDIT_CACHE_DIR", str(tmp_path / "cache"))
    model, tok = peaked(tiny_model("llama")), tiny_tokenizer()
    hp = {"method": "memit", "layers": [0, 1], "clamp_norm_factor": 20, "v_weight_decay": 1e-3, "v_lr": 1.0}
    hp |= {"v_lr_relative": True, "v_num_grad_steps": 10, "kl_factor": 0.0, "mom2_update_weight": 1.0}
    (tmp_path / "memit.json").write_text(json.dumps(hp))
    cfg = _small_cfg(tmp_path, counterfact, editors=["memit"], editor_hparams={"memit": str(tmp_path / "memit.json")})
    sets = build_question_sets(
        model,
        tok,
        "languages",
        counterfact=counterfact,
        candidates_per_topic=24,
        max_forget=8,
        retain_questions=14,
        min_forget=2,
    )
    row = edit_row(Scorer(model, tok, sets), "memit", {"retain": 1.0, "forget": 1.0, "forget_installed": 1.0}, cfg)

    requests = [_request(q, EditRequest) for q in sets.forget]
    assert all(r.paraphrases == () for r in requests) and all(q.rephrase for q in sets.forget)
    hparams = load_hparams("memit", model, cfg.editor_hparams["memit"])
    stats = ensure_stats(model, tok, list(hparams.layers), dm=10, corpus=cfg.corpus)
    apply_edit(model, tok, requests, method="memit", hparams=hparams, stats={k: v.mean for k, v in stats.items()})
    on_paraphrase = float(accuracy_flags(model, tok, sets.forget, on="rephrase")[0].float().mean())
    on_installed = float(accuracy_flags(model, tok, sets.forget, on="prompt")[0].float().mean())
    assert on_installed < on_paraphrase  # the edit took on its own prompts and generalises only partly
    assert row["forget_acc"] == pytest.approx(on_paraphrase)
    assert row["forget_acc_installed"] == pytest.approx(on_installed)
    assert row["score"] in (0.0, pytest.approx(1 - on_paraphrase))
    # the row records the resolved hparams it edited with, and no path of this machine
    assert row["hparams"]["file"] == "memit.json" and row["hparams"]["layers"] == [0, 1]
    assert str(tmp_path) not in json.dumps(row)


def test_retain_set_has_the_configured_size_spread_over_the_other_topics(counterfact):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    sets = build_question_sets(
        model,
        tok,
        "languages",
        counterfact=counterfact,
        candidates_per_topic=40,
        max_forget=6,
        retain_questions=21,
        min_forget=2,
    )
    assert len(sets.retain) == 21 and len({q.case_id for q in sets.retain}) == 21
    per_topic = {t: v["used"] for t, v in sets.topics.items() if t != "languages"}
    assert sum(per_topic.values()) == 21 and "languages" not in {q.topic for q in sets.retain}
    assert max(per_topic.values()) - min(per_topic.values()) <= 1  # 7 topics × 3
    # Forget questions: answered on the rewrite prompt and on the paraphrase; retain: answered on the prompt.
    assert accuracy_flags(model, tok, sets.forget, on="rephrase")[0].all()
    assert accuracy_flags(model, tok, sets.forget)[0].all() and accuracy_flags(model, tok, sets.retain)[0].all()
    with pytest.raises(FasteditError, match="need 400"):
        build_question_sets(
            model,
            tok,
            "languages",
            counterfact=counterfact,
            candidates_per_topic=40,
            retain_questions=400,
            min_forget=2,
        )


def test_gate_tolerance_counts_flipped_retain_answers():
    gate = RetainGate(300, 0.01)
    assert gate.max_flipped == 3 and gate.passes(3) and not gate.passes(4)
    assert RetainGate(70, 0.01).max_flipped == 0  # 1 % of 70 questions: no answer may flip
    assert RetainGate(14, 0.15).as_dict()["min_retain_acc"] == pytest.approx(12 / 14)


def test_one_forward_scoring_matches_scoring_each_answer_alone():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cases = [
        ("The mother tongue of Danielle Darrieux is", "French", "English"),  # two rows
        ("Toko Yasuda plays the", "Italian", "Ital"),  # " Ital"[:-1] is a prefix of " Italian": one row
        ("Rome is the capital of", "It", "Italian"),
    ]
    probes = [make_probe(tok, *c) for c in cases]
    assert [len(p.rows) for p in probes] == [2, 1, 1]
    wins, top1 = score_probes(model, probes, pad_id=tok.pad_token_id or 0, bos_id=tok.bos_token_id)

    def nll(prompt: str, answer: str) -> tuple[float, int]:
        p = tok(prompt)["input_ids"]
        a = tok(" " + answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([p + a])).logits[0].log_softmax(-1)
        pred = logp[len(p) - 1 : len(p) + len(a) - 1]
        return float(-pred.gather(1, torch.tensor(a)[:, None]).mean()), int(pred[0].argmax()) == a[0]

    for (prompt, true, new), w, t in zip(cases, wins.tolist(), top1.tolist(), strict=True):
        (n_true, first), (n_new, _) = nll(prompt, true), nll(prompt, new)
        assert w == (n_true < n_new) and t == first


def test_an_earlier_result_is_kept_unless_overwrite(tmp_path, counterfact):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    save_sae(_random_sae(), SAEInfo("tiny", 1), tmp_path / "sae", torch.zeros(32))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "unlearning.json").write_text("{}")
    with pytest.raises(FasteditError, match="--overwrite"):
        run_unlearning(
            model, [tmp_path / "sae"], tmp_path / "out", tokenizer=tok, config=_small_cfg(tmp_path, counterfact)
        )
    assert (tmp_path / "out" / "unlearning.json").read_text() == "{}"


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
    eval_args = ["sae", "eval", str(tmp_path / "s"), "--corpus", str(corpus), "--tokens", "500", "--dtype", "float64"]
    res = runner.invoke(cli, eval_args)  # a float64 model under the float32 SAE
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["hook"] == "blocks.1.hook_resid_post"
    res = runner.invoke(cli, ["sae", "eval", str(tmp_path)])
    assert res.exit_code == 1 and res.output.startswith("error:") and "SAELens layout" in res.output
    args = ["unlearn", "--model", str(tmp_path / "model"), "--sae", str(tmp_path / "s"), "--editors", ""]
    args += ["--candidates", "60", "--max-forget", "20", "--retain-questions", "14", "--corpus", str(corpus)]
    args += ["--counterfact", str(counterfact), "--out", str(tmp_path / "u"), "--dtype", "float64"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "| topk |" in res.stdout and (tmp_path / "u" / "unlearning.png").exists()
    saved = json.loads((tmp_path / "u" / "unlearning.json").read_text())
    assert saved["placement"] == {"device": "cpu", "dtype": "torch.float64"}


def test_sae_commands_check_device_before_any_work(tmp_path):
    """--device/--dtype exist on every command that loads a model, and a device torch lacks is one line."""
    runner = CliRunner()
    train = ["sae", "train", "--model", "smollm2-135m", "--layer", "1", "--out", str(tmp_path / "s")]
    unlearn = ["unlearn", "--model", "smollm2-135m", "--sae", str(tmp_path), "--out", str(tmp_path / "u")]
    for args in (train, unlearn):
        res = runner.invoke(cli, [*args, "--device", "cuda:99", "--dtype", "bfloat16"])
        assert res.exit_code == 1 and res.output.startswith("error:") and "no such CUDA device" in res.output, args
    assert not (tmp_path / "s").exists() and not (tmp_path / "u").exists()


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
