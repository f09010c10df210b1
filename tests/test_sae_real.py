"""A small TopK SAE on the real SmolLM2-135M reconstructs held-out WikiText activations (marker `real`)."""

from __future__ import annotations

import pytest

from fastedit.sae.api import train_sae
from fastedit.sae.io import load_sae


@pytest.mark.real
def test_small_topk_sae_on_smollm2_explains_held_out_variance(smollm2, tmp_path, wikitext):
    model, tok = smollm2
    res = train_sae(
        model,
        3,
        tmp_path / "sae",
        tokenizer=tok,
        arch="topk",
        width=1152,
        tokens=16_000,
        corpus=wikitext,
        k=32,
        lr=2e-3,
        epochs=6,
        buffer_size=16_384,
        eval_tokens=4_000,
        ce_windows=2,
        activation_cache=tmp_path / "acts",
    )
    assert res["explained_variance"] > 0.5, res
    assert res["l0"] == pytest.approx(32, abs=0.5)
    assert res["ce_recovered"] > 0.5, res  # spliced into the model through the hook, the SAE keeps most of the loss
    sae, info = load_sae(tmp_path / "sae")
    assert (info.layer, info.hook_name, sae.cfg.d_in) == (3, "blocks.3.hook_resid_post", 576)
