"""`fastedit precompute` end to end on a tiny saved model, and its torchrun (gloo, 2 processes) mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import tiny_model, tiny_tokenizer

from fastedit.cli import cli
from fastedit.stats.cache import read_stats


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _run(*args: str):
    return CliRunner().invoke(cli, ["precompute", *args], catch_exceptions=False)


def test_precompute_cli_writes_then_hits_the_cache(tiny_folder, tmp_path, text_corpus):
    args = ["--model", str(tiny_folder), "--dm", "2", "--layers", "0,2", "--corpus", str(text_corpus)]
    args += ["--seq-len", "32", "--batch-tokens", "64", "--out", str(tmp_path), "--eps", "0.01"]
    first = _run(*args)
    assert first.exit_code == 0, first.output
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2 and all(read_stats(f).count == 80 for f in files)
    lines = [line for line in first.stdout.splitlines() if line.startswith("layer")]
    assert len(lines) == 2 and all(
        "computed" in line and "cond(C0) " in line and "cond(C0+0.01·tr/d·I)" in line for line in lines
    )
    second = _run(*args)
    assert second.exit_code == 0 and second.stdout.count("cache hit") == 2


def test_precompute_cli_layer_ranges_and_hparams(tiny_folder, tmp_path, text_corpus):
    hp = tmp_path / "hp.json"
    hp.write_text('{"method": "memit", "layers": [1], "clamp_norm_factor": 4.0, "v_weight_decay": 0.001}')
    common = ["--model", str(tiny_folder), "--dm", "1", "--corpus", str(text_corpus), "--seq-len", "32"]
    result = _run(*common, "--hparams", str(hp), "--out", str(tmp_path / "a"))
    assert result.exit_code == 0 and "layers 1 (" in result.stdout
    result = _run(*common, "--layers", "0-2", "--out", str(tmp_path / "b"))
    assert result.exit_code == 0 and len(list((tmp_path / "b").glob("*.safetensors"))) == 3


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--layers", "0", "--dm", "0"], 1, "error: d_m must be > 0"),
        (["--layers", "7"], 1, "error: layer(s) [7] out of range"),
        (["--layers", "four"], 2, "use layer indices like 4,5,6"),
        (["--layers", "0", "--corpus", "/no/corpus.txt"], 1, "error: corpus '/no/corpus.txt' does not exist"),
        (["--hparams", "/nonexistent.json"], 1, "error: hparams file '/nonexistent.json' does not exist"),
        (["--hparams", "/nonexistent.json", "--layers", "0"], 1, "error: pass either --layers or --hparams"),
    ],
)
def test_precompute_cli_bad_input(tiny_folder, tmp_path, args, code, message, text_corpus):
    base = ["--model", str(tiny_folder), "--corpus", str(text_corpus), "--out", str(tmp_path)]
    result = CliRunner().invoke(cli, ["precompute", *base, *args])
    assert result.exit_code == code
    assert message in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.distributed
def test_torchrun_two_processes_equal_single_process(tiny_folder, tmp_path, text_corpus):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    args = ["--model", str(tiny_folder), "--dm", "6", "--layers", "0,2", "--corpus", str(text_corpus)]
    args += ["--seq-len", "32", "--batch-tokens", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "fastedit.cli", "precompute", *args,
         "--out", str(tmp_path / "dist")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("computed") == 2  # only rank 0 prints the summary
    single = _run(*args, "--out", str(tmp_path / "single"))
    assert single.exit_code == 0
    for layer in (0, 2):
        (d,) = (tmp_path / "dist").glob(f"*layer{layer:02d}*.safetensors")
        (s,) = (tmp_path / "single").glob(f"*layer{layer:02d}*.safetensors")
        a, b = read_stats(d), read_stats(s)
        assert a.count == b.count == 240
        assert float((a.mean - b.mean).norm() / b.mean.norm()) < 1e-10
