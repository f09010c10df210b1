"""`fastedit.edit` / `fastedit.evaluate` and the `fastedit edit` command, end to end on tiny models (real MEMIT)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_model, tiny_tokenizer

import fastedit
from fastedit.cli import cli
from fastedit.editing.hparams import EditHparams
from fastedit.editing.patch import Patch, apply_patch, revert_patch
from fastedit.errors import ConfigError, FasteditError

REQUESTS = [
    {
        "case_id": "italy",
        "prompt": "The capital of {} is",
        "subject": "Italy",
        "target_new": "Paris",
        "target_true": "Rome",
        "paraphrases": ["Italy has the capital"],
        "neighborhood_prompts": ["The capital of Germany is"],
        "neighborhood_answers": ["Berlin"],
    },
    {
        "case_id": "jordan",
        "prompt": "{} plays",
        "subject": "Michael Jordan",
        "target_new": "guitar",
        "target_true": "basketball",
    },
    {
        "case_id": "nile",
        "prompt": "The {} flows through",
        "subject": "Nile",
        "target_new": "Japan",
        "target_true": "Egypt",
    },
]
HP = {
    "method": "memit",
    "layers": [0, 1],
    "clamp_norm_factor": 4.0,
    "v_weight_decay": 1e-3,
    "mom2_update_weight": 1.0,
    "v_num_grad_steps": 8,
    "context_seeds": ["The"],
    "context_length": 3,
}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def stats(tmp_path_factory, text_corpus):
    """C0 of layers 0-1 of the tiny llama from WikiText (computed once, via the real stats module)."""
    from fastedit.stats import ensure_stats

    model = tiny_model("llama")
    out = tmp_path_factory.mktemp("stats")
    return ensure_stats(
        model, tiny_tokenizer(), [0, 1], dm=2, corpus=str(text_corpus), out=out, seq_len=64, progress=False
    )


def test_edit_returns_patch_and_metrics_and_model_is_in_patch_form(stats):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = _state(model)
    outcome = fastedit.edit(model, tok, REQUESTS, method="memit", hparams=EditHparams(**HP), stats=stats, batch_size=2)
    assert outcome.pre.summary["n"] == outcome.post.summary["n"] == 3
    assert outcome.patch.layers == [0, 1] and outcome.patch.metadata["case_ids"] == ["italy", "jordan", "nile"]
    assert outcome.patch.rank(0) == 3  # two batches: rank 2 + rank 1
    assert set(outcome.info["timings"]) >= {"edit", "eval_pre", "eval_post"}
    assert outcome.post.summary["es"] > outcome.pre.summary["es"]  # MEMIT moved the rewrites
    # The edited model is exactly the original plus the patch, and the patch reverts it bit-exactly.
    fresh = tiny_model("llama")
    apply_patch(fresh, outcome.patch)
    assert _same(fresh, model.state_dict())
    revert_patch(model, outcome.patch)
    assert _same(model, before)
    metrics = fastedit.evaluate(model, tok, REQUESTS)
    assert metrics.summary == outcome.pre.summary


def test_alphaedit_sequential_batches(stats):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    hp = EditHparams(**{**HP, "method": "alphaedit", "nullspace_threshold": 0.5})
    outcome = fastedit.edit(
        model, tok, REQUESTS, method="alphaedit", hparams=hp, stats=stats, batch_size=1, evaluate=False
    )
    assert outcome.pre is None and outcome.patch.rank(1) == 3 and len(outcome.info["batches"]) == 3


def test_failure_midway_leaves_the_model_unedited(stats, monkeypatch):
    from fastedit.editing import engine

    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = _state(model)
    real = engine.apply_edit
    calls = []

    def second_batch_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # batch 1 already edited the weights in place
            raise FasteditError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "apply_edit", second_batch_fails)
    with pytest.raises(FasteditError, match="boom"):
        fastedit.edit(model, tok, REQUESTS, hparams=EditHparams(**HP), stats=stats, batch_size=1, evaluate=False)
    assert len(calls) == 2 and _same(model, before)


def test_bad_settings_are_clear_errors(stats):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ConfigError, match=r"layers \[7\] are outside"):
        fastedit.edit(model, tok, REQUESTS, hparams=EditHparams(**{**HP, "layers": [1, 7]}), stats=stats)
    with pytest.raises(ConfigError, match="needs layers"):
        fastedit.edit(model, tok, REQUESTS, hparams=EditHparams(**HP), stats={0: stats[0]})
    with pytest.raises(FasteditError, match="record 0: target_new is empty"):
        fastedit.edit(model, tok, [{**REQUESTS[0], "target_new": " "}], hparams=EditHparams(**HP), stats=stats)


def test_cli_edit_on_a_tiny_model_folder(tmp_path, text_corpus):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps(REQUESTS))
    hparams = tmp_path / "hp.json"
    hparams.write_text(json.dumps(HP))
    out = tmp_path / "run"
    args = ["edit", str(requests), "--model", str(folder), "--hparams", str(hparams), "--out", str(out)]
    args += ["--corpus", str(text_corpus), "--dm", "2", "--stats-dir", str(tmp_path / "stats"), "--batch-size", "2"]
    args += ["--save-patch", str(tmp_path / "copy.safetensors"), "--save-model", str(tmp_path / "edited")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "ES" in result.output and "Score" in result.output and str(out) in result.output

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["method"] == "memit" and metrics["model"] == str(folder)
    for key in ("es", "ps", "ns", "score", "em", "pm", "nm"):
        assert key in metrics["pre"] and key in metrics["post"]
    assert {"edit", "eval_pre", "eval_post", "total"} <= set(metrics["timings"])
    cases = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [c["case_id"] for c in cases] == ["italy", "jordan", "nile"] and "es" in cases[0]["post"]
    run = json.loads((out / "run.json").read_text())
    assert run["hparams"]["layers"] == [0, 1] and run["options"]["batch_size"] == 2 and "torch" in run["versions"]
    assert run["stats"]["0"]["dm"] == "2"
    assert not list(out.glob(".*"))  # no temp files left

    # The saved edited model = the original + the patch; the patch reverts it bit-exactly.
    edited, _ = fastedit.load_model(str(tmp_path / "edited"))
    original, _ = fastedit.load_model(str(folder))
    state = _state(original)
    patch = Patch.load(out / "patch.safetensors")
    assert Patch.load(tmp_path / "copy.safetensors").metadata == patch.metadata
    apply_patch(original, patch)
    assert _same(original, edited.state_dict())
    revert_patch(edited, patch)
    assert _same(edited, state)

    again = CliRunner().invoke(cli, args[:-4])
    assert again.exit_code == 1 and "already holds a run" in again.output


def test_cli_reports_bad_requests_in_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    records = [{**REQUESTS[0], "prompt": "The capital of Italy is", "subject": "France"}, REQUESTS[1]]
    bad.write_text(json.dumps([*records, {**REQUESTS[2], "target_new": "Egypt"}]))
    result = CliRunner().invoke(cli, ["edit", str(bad), "--model", "no-such-model"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "record 0: subject 'France' not found" in result.output and "record 2: target_new 'Egypt'" in result.output


def test_targets_cache_is_shared_by_methods_and_keyed_by_the_weights(stats, tmp_path):
    """A second method on the same model and requests reuses the v* targets; the same edit without the cache
    gives the same deltas; other weights (an earlier edit) miss the cache."""
    tok = tiny_tokenizer()
    hp = EditHparams(**HP)
    first_model = tiny_model("llama")
    first = fastedit.edit(first_model, tok, REQUESTS, hparams=hp, stats=stats, evaluate=False, targets_cache=tmp_path)
    assert first.info["batches"][0]["targets_from_cache"] is False
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    emmet = fastedit.edit(
        tiny_model("llama"), tok, REQUESTS, method="emmet", hparams=hp.replace(method="emmet"), stats=stats,
        evaluate=False, targets_cache=tmp_path,
    )  # fmt: skip
    assert emmet.info["batches"][0]["targets_from_cache"] is True
    plain = fastedit.edit(tiny_model("llama"), tok, REQUESTS, hparams=hp, stats=stats, evaluate=False)
    for layer in hp.layers:
        assert torch.allclose(first.patch.delta(layer), plain.patch.delta(layer), atol=1e-6)
    # first_model is now edited: its targets for the same requests are a new computation.
    again = fastedit.edit(first_model, tok, REQUESTS, hparams=hp, stats=stats, evaluate=False, targets_cache=tmp_path)
    assert again.info["batches"][0]["targets_from_cache"] is False
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
