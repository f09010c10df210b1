"""`fastedit precompute` on SmolLM2 layers 4,8 at d_m 2 against plain forward hooks."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from fastedit.cli import cli
from fastedit.stats.cache import read_stats
from fastedit.stats.corpus import resolve_corpus
from fastedit.stats.precompute import DEFAULT_SEQ_LEN
from fastedit.stats.tokens import plan_rows

pytestmark = pytest.mark.real


def _precompute(*args: str):
    result = CliRunner().invoke(cli, ["precompute", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_smollm2_c0_equals_plain_hooks_and_caches_do_not_mix(smollm2, tmp_path, wikitext):
    model, tok = smollm2
    args = [
        "--model",
        "smollm2-135m",
        "--dm",
        "2",
        "--layers",
        "4,8",
        "--corpus",
        str(wikitext),
        "--out",
        str(tmp_path),
    ]
    first = _precompute(*args)
    files = sorted(tmp_path.glob("smollm2-135m.layer*.safetensors"))
    assert len(files) == 2 and first.stdout.count("computed") == 2

    # Independent: the same 3072 tokens, one unpadded row at a time, plain hooks, the whole model.
    rows = plan_rows(tok, resolve_corpus(str(wikitext), model, tok).documents(0), 3072, DEFAULT_SEQ_LEN)
    assert sum(len(r) for r in rows) == 3072
    sums = {4: torch.zeros(1536, 1536, dtype=torch.float64), 8: torch.zeros(1536, 1536, dtype=torch.float64)}

    def hook(layer: int):
        def add(_module, args) -> None:  # returns None: the input is left untouched
            keys = args[0][0].double()  # (seq, d_k)
            sums[layer].addmm_(keys.T, keys)

        return add

    handles = [model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook(layer)) for layer in sums]
    try:
        with torch.no_grad():
            for row in rows:
                model(input_ids=row[None])
    finally:
        for handle in handles:
            handle.remove()
    for layer, path in zip((4, 8), files, strict=True):
        stats = read_stats(path)
        assert stats.count == 3072 and stats.layer == layer
        reference = sums[layer] / 3072
        assert float((stats.mean - reference).norm() / reference.norm()) < 1e-6

    assert _precompute(*args).stdout.count("cache hit") == 2
    # Another model into the same folder: its own files, and SmolLM2's are still hits.
    other = ["--model", "gemma3-270m", "--dm", "0.5", "--layers", "4,8", "--corpus", str(wikitext)]
    assert _precompute(*other, "--out", str(tmp_path)).stdout.count("computed") == 2
    gemma_files = sorted(tmp_path.glob("gemma3-270m.layer*.safetensors"))
    assert [read_stats(f).d_k for f in gemma_files] == [2048, 2048]
    assert _precompute(*args).stdout.count("cache hit") == 2
