"""Inputs a careless or hostile user gives: each is refused with one clear line, before expensive work, and never
loses or silently replaces earlier results (tiny random models, temp files)."""

from __future__ import annotations

import fcntl
import json
import threading
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import D_K, D_MODEL, TEXT, tiny_config, tiny_model, tiny_tokenizer

from fastedit.arch import arch_for, mlp_out_matrix, snapshot_mlp_out
from fastedit.cli import cli
from fastedit.editing.hparams import HPARAMS_DIR, hparams_path
from fastedit.editing.patch import Patch, apply_patch, make_patch, revert_patch
from fastedit.editing.run import default_out
from fastedit.errors import PatchError
from fastedit.stats import ensure_stats
from fastedit.stats.errors import StatsCacheError
from fastedit.stats.precompute import run_stats

REQUESTS = [
    {"case_id": "italy", "prompt": "The capital of {} is", "subject": "Italy", "target_new": "Paris"},
    {"case_id": "nile", "prompt": "The {} flows through", "subject": "Nile", "target_new": "Japan"},
]
HP = {
    "method": "memit",
    "layers": [0, 1],
    "clamp_norm_factor": 4.0,
    "v_weight_decay": 1e-3,
    "mom2_update_weight": 1.0,
    "v_num_grad_steps": 4,
    "context_seeds": ["The"],
    "context_length": 3,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny llama folder, its hparams, requests, a corpus and a shared stats folder."""
    root = tmp_path_factory.mktemp("hostile")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "hp.json").write_text(json.dumps(HP))
    (root / "requests.json").write_text(json.dumps(REQUESTS))
    (root / "corpus.txt").write_text(TEXT * 20)
    return root


def _edit_args(env, out, *extra):
    return [
        "edit", str(env / "requests.json"), "--model", str(env / "model"), "--hparams", str(env / "hp.json"),
        "--out", str(out), "--corpus", str(env / "corpus.txt"), "--dm", "2", "--stats-dir", str(env / "stats"),
        "--eval-batch-size", "4", *extra,
    ]  # fmt: skip


def _one_line_error(result, *fragments):
    """Exit 1 and one ``error: ...`` line holding every fragment (progress bars of model loading aside)."""
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and result.exc_info[0] is SystemExit, result.output
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ---- patches verify themselves -------------------------------------------------------------------------------


def _patch_file(tmp_path, **kwargs):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    factors = {l: (torch.randn(D_MODEL, 3, generator=g) * 0.01, torch.randn(D_K, 3, generator=g)) for l in (0, 2)}
    patch = make_patch(
        model, factors, snapshot_mlp_out(model, arch_for(model), [0, 2]), method="memit", model="tiny", **kwargs
    )
    return model, patch.save(tmp_path / "p.safetensors")


def _flip_bit(path, key, bit=3):
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert tensors[key].numel() > 0, f"{key} is empty"
    tensors[key].reshape(-1).view(torch.int32)[0] ^= 1 << bit
    save_file(tensors, str(path), metadata=meta)


def _weights(model):
    spec = arch_for(model)
    return [mlp_out_matrix(model, spec, l).clone() for l in range(3)]


@pytest.mark.parametrize(("store_originals", "key"), [(True, "layers.2.original"), (False, "layers.2.residue_value")])
def test_a_flipped_bit_in_the_revert_data_is_refused_before_any_weight_changes(tmp_path, store_originals, key):
    model, path = _patch_file(tmp_path, store_originals=store_originals)
    _flip_bit(path, key)
    before = _weights(model)
    with pytest.raises(PatchError, match=r"revert data of layer 2 .* corrupt"):
        apply_patch(model, path)  # applying it would leave a model that cannot be restored exactly
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before, strict=True))


def test_a_flipped_bit_in_a_factor_is_refused_before_any_weight_changes(tmp_path):
    model, path = _patch_file(tmp_path)
    _flip_bit(path, "layers.2.A", bit=30)
    before = _weights(model)
    with pytest.raises(PatchError, match=r"factors of layer 2 .* corrupt"):
        apply_patch(model, path)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before, strict=True))
    # A corrupt patch is also refused when reverting a model that carries the intact patch.
    (tmp_path / "intact").mkdir()
    intact_model, intact = _patch_file(tmp_path / "intact")
    apply_patch(intact_model, intact)
    corrupt = Patch.load(intact)
    corrupt.residue[0][1].view(torch.int32)[0] ^= 1 << 3
    patched = _weights(intact_model)
    with pytest.raises(PatchError, match=r"revert data of layer 0 .* nothing was reverted"):
        revert_patch(intact_model, corrupt)
    assert all(torch.equal(a, b) for a, b in zip(_weights(intact_model), patched, strict=True))


def test_patch_made_on_float32_is_named_a_dtype_mismatch_on_bfloat16(tmp_path):
    _, path = _patch_file(tmp_path)
    with pytest.raises(PatchError, match=r"dtype mismatch: .* float32 .* bfloat16"):
        apply_patch(tiny_model("llama").to(torch.bfloat16), path)


# ---- edit runs never lose or overwrite work --------------------------------------------------------------------


def test_unwritable_out_is_refused_before_the_model_loads(env, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    args = _edit_args(env, tmp_path / "file" / "run")
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")  # loading it would fail: it never happens
    _one_line_error(CliRunner().invoke(cli, args), "cannot write the run folder", "file")


def test_save_patch_never_replaces_another_runs_patch(env, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"another run's patch")
    args = _edit_args(env, tmp_path / "run", "--save-patch", str(other))
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    _one_line_error(CliRunner().invoke(cli, args), "--save-patch file", "already exists", "--overwrite")
    assert other.read_bytes() == b"another run's patch" and not (tmp_path / "run").exists()


def test_interrupt_after_the_patch_is_written_leaves_nothing_and_a_rerun_works(env, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = Patch.save

    def save_then_interrupt(self, path, **kwargs):
        real_save(self, path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Patch, "save", save_then_interrupt)
    result = CliRunner().invoke(cli, _edit_args(env, out))
    assert result.exit_code != 0
    assert not out.exists() and not list(tmp_path.iterdir())  # no partial run folder, no temp folder
    monkeypatch.setattr(Patch, "save", real_save)
    again = CliRunner().invoke(cli, _edit_args(env, out))
    assert again.exit_code == 0, again.output
    assert {p.name for p in out.iterdir()} == {"patch.safetensors", "cases.jsonl", "run.json", "metrics.json"}


def test_two_runs_started_in_the_same_second_get_different_folders():
    first, second = default_out("smollm2-135m", "memit"), default_out("smollm2-135m", "memit")
    assert first != second and first.parent == second.parent


def test_a_prompt_longer_than_the_model_is_refused_before_v_star(env, tmp_path):
    words = TEXT.split()
    long_prompt = "The capital of {} is " + " ".join(words[i % len(words)] for i in range(300))
    (tmp_path / "long.json").write_text(json.dumps([{**REQUESTS[0], "prompt": long_prompt}]))
    args = _edit_args(env, tmp_path / "run")
    args[1] = str(tmp_path / "long.json")
    _one_line_error(CliRunner().invoke(cli, args), "request 'italy'", "tokens long", "128 positions")
    assert not (tmp_path / "run").exists()


# ---- every user mistake is one line ----------------------------------------------------------------------------


def _bad_inputs(env, tmp_path, case):
    """(CLI args, the file the error must name) for each kind of broken input."""
    bogus_model = str(tmp_path / "no-such-model")
    if case == "request-latin1":
        bad = tmp_path / "requests.json"
        bad.write_bytes(json.dumps(REQUESTS).replace("Paris", "Par\u00eds").encode("latin-1"))
        return ["edit", str(bad), "--model", bogus_model], bad
    if case == "hparams-latin1":
        bad = tmp_path / "hp.json"
        bad.write_bytes(json.dumps({**HP, "notes": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"))
        return ["edit", str(env / "requests.json"), "--model", bogus_model, "--hparams", str(bad)], bad
    if case == "binary-jsonl-corpus":
        bad = tmp_path / "corpus.jsonl"
        bad.write_bytes(bytes(range(256)) * 8)
        args = ["precompute", "--model", str(env / "model"), "--layers", "0", "--dm", "1"]
        return [*args, "--corpus", str(bad), "--out", str(tmp_path / "stats")], bad
    if case == "corrupt-sae-weights":
        folder = tmp_path / "sae"
        folder.mkdir()
        cfg = {"architecture": "standard", "hook_name": "blocks.0.hook_resid_post", "model_name": bogus_model}
        (folder / "cfg.json").write_text(json.dumps(cfg))
        (folder / "sae_weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        return ["sae", "eval", str(folder)], folder / "sae_weights.safetensors"
    if case == "config-only-model-folder":
        folder = tmp_path / "config-only"
        tiny_config("llama").save_pretrained(folder)
        return ["precompute", "--model", str(folder), "--layers", "0", "--out", str(tmp_path / "stats")], folder
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["request-latin1", "hparams-latin1", "binary-jsonl-corpus", "corrupt-sae-weights", "config-only-model-folder"],
)
def test_broken_files_are_one_line_errors_naming_the_file(env, tmp_path, case):
    args, bad = _bad_inputs(env, tmp_path, case)
    _one_line_error(CliRunner().invoke(cli, args), str(bad))


def test_corrupt_patch_metadata_is_a_patch_error(tmp_path):
    _, path = _patch_file(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={"fastedit_patch": '{"format": "fastedit-patch/2", "layers": [0, '})
    with pytest.raises(PatchError, match="metadata is not valid JSON"):
        Patch.load(path)
    save_file(tensors, str(path), metadata={"fastedit_patch": '{"format": "fastedit-patch/2", "layers": [0, 2]}'})
    with pytest.raises(PatchError, match="lacks"):
        Patch.load(path)


def test_binary_text_corpus_is_refused(env, tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    args = ["precompute", "--model", str(env / "model"), "--layers", "0", "--dm", "1", "--corpus", str(bad)]
    line = _one_line_error(CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "stats")]), str(bad))
    assert "binary" in line
    assert not list((tmp_path / "stats").glob("*.safetensors")) if (tmp_path / "stats").exists() else True


# ---- SAE folders ---------------------------------------------------------------------------------------------


def _saved_sae(folder, seed, **kwargs):
    from fastedit.sae.io import SAEInfo, save_sae
    from fastedit.sae.model import SAE, SAEConfig

    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=D_MODEL, d_sae=32, arch="relu", activation="relu"))
    save_sae(sae, SAEInfo("tiny", 1), folder, torch.zeros(32), **kwargs)
    return sae


def test_sae_train_into_an_existing_sae_is_refused_and_an_interrupted_save_keeps_the_old_one(tmp_path, monkeypatch):
    from fastedit.sae import io
    from fastedit.sae.io import load_sae

    folder = tmp_path / "sae"
    old = _saved_sae(folder, seed=0)
    args = ["sae", "train", "--model", str(tmp_path / "no-such-model"), "--layer", "0", "--out", str(folder)]
    _one_line_error(CliRunner().invoke(cli, args), str(folder), "already exists", "--overwrite")

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "write_text", interrupted)  # weights written, cfg.json interrupted
    with pytest.raises(KeyboardInterrupt):
        _saved_sae(folder, seed=1, overwrite=True)
    loaded, _ = load_sae(folder)
    assert torch.equal(loaded.W_enc, old.W_enc) and not list(tmp_path.glob(".*"))


# ---- the statistics cache --------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["nan", "shape"])
def test_damaged_statistics_are_refused_not_reported_as_a_cache_hit(env, tmp_path, damage):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    kwargs = {"dm": 2, "corpus": str(env / "corpus.txt"), "out": tmp_path, "seq_len": 32, "progress": False}
    ensure_stats(model, tok, [0], **kwargs)
    (path,) = tmp_path.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if damage == "nan":
        tensors["mean"][3, 5] = float("nan")
    else:
        tensors["mean"] = tensors["mean"][:-1, :-1].contiguous()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(StatsCacheError, match=r"damaged .* delete it"):
        ensure_stats(model, tok, [0], **kwargs)


def test_a_second_precompute_of_the_same_statistics_waits_and_hits_the_cache(env, tmp_path):
    """The test holds the lock, puts finished statistics in place, and releases it: the waiting run must use
    them instead of computing its own."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    kwargs = {"dm": 2, "corpus": str(env / "corpus.txt"), "seq_len": 32, "progress": False, "model_name": "tiny"}
    ensure_stats(model, tok, [0], out=tmp_path / "done", **kwargs)
    (done,) = (tmp_path / "done").glob("*.safetensors")
    folder = tmp_path / "shared"
    folder.mkdir()
    key = done.name.removesuffix(".safetensors").replace(".layer00", "")
    results = []
    with (folder / f"{key}.lock").open("a") as lock:  # the lock file next to the cache files
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: results.append(run_stats(model, tok, [0], out=folder, **kwargs)))
        worker.start()
        time.sleep(1.0)  # let it reach the lock (an unlocked run would be computing by now)
        (folder / done.name).write_bytes(done.read_bytes())
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    worker.join(60)
    assert results and results[0].info[0].cached  # a cache hit, not a second computation
    assert sorted(p.name for p in folder.iterdir()) == [done.name]  # and no lock file left behind


# ---- the hparams lookup and options checked before the model loads ------------------------------------------


def test_a_model_path_is_never_read_as_an_hparams_file(tmp_path):
    folder = tmp_path / "mymodel"
    tiny_config("llama").save_pretrained(folder)
    (tmp_path / "mymodel.json").write_text(json.dumps({**HP, "layers": [0]}))  # next to the model, not hparams
    assert hparams_path("memit", str(folder)) == HPARAMS_DIR / "memit" / "llama.json"
    model = tiny_model("llama")
    model.fastedit_name = str(folder)
    assert hparams_path("memit", model) == HPARAMS_DIR / "memit" / "llama.json"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["precompute", "--dm", "nan", "--layers", "0"], ["d_m must be > 0", "nan"]),
        (["precompute", "--layers", "5-3"], ["5-3 is reversed"]),
        (["precompute", "--hparams", "HP_MISSING_KEY"], ["missing key(s) clamp_norm_factor"]),
        (["edit", "REQUESTS", "--dm", "inf"], ["d_m must be > 0", "inf"]),
        (["edit", "REQUESTS", "--dm", "nan"], ["d_m must be > 0", "nan"]),
        (["edit", "REQUESTS", "--hparams", "HP_MISSING_KEY"], ["missing key(s) clamp_norm_factor"]),
    ],
)
def test_option_errors_come_before_the_model_loads(env, tmp_path, args, fragments):
    bad_hp = tmp_path / "hp.json"
    bad_hp.write_text(json.dumps({"method": "memit", "layers": [0], "v_weight_decay": 0.1}))
    names = {"HP_MISSING_KEY": str(bad_hp), "REQUESTS": str(env / "requests.json")}
    args = [names.get(a, a) for a in args] + ["--model", str(tmp_path / "no-such-model")]  # never loaded
    result = CliRunner().invoke(cli, args)
    if result.exit_code == 2:  # click's usage errors (--layers is parsed by click)
        assert all(f in result.output for f in fragments) and "Traceback" not in result.output, result.output
    else:
        _one_line_error(result, *fragments)
