"""SAE folders against the real SAELens package, both directions (CI installs sae-lens with the dev extra)."""

from __future__ import annotations

import json

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[interop]')")

from sae_lens.saes.sae import SAEMetadata  # noqa: E402

from fastedit.sae.io import SAEFormatError, SAEInfo, load_sae, parse_hook, save_sae  # noqa: E402
from fastedit.sae.model import SAE, SAEConfig  # noqa: E402

D_IN, D_SAE = 12, 48


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _fastedit_sae(arch: str) -> SAE:
    """A random SAE with a non-trivial training scale and some pruned features (what save must fold)."""
    torch.manual_seed(0)
    activation = "relu" if arch == "relu" else "topk"
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, arch=arch, activation=activation, k=6, n_clusters=4, rank=3))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.scale.fill_(3.7)
        sae.alive[::7] = 0
    return sae.eval()


@pytest.mark.parametrize("arch", ["relu", "topk", "factor", "hiercontrastive"])
def test_saelens_loads_a_fastedit_sae_and_reconstructs_the_same(tmp_path, arch):
    sae = _fastedit_sae(arch)
    save_sae(sae, SAEInfo("smollm2-135m", 3, "mlp_out"), tmp_path, torch.zeros(D_SAE))
    theirs = sae_lens.SAE.load_from_disk(tmp_path)  # fails on any key it does not expect
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_mlp_out"
    assert theirs.cfg.metadata.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert theirs.cfg.architecture() == ("standard" if arch == "relu" else "topk")
    x = torch.randn(64, D_IN) * 4
    with torch.no_grad():
        assert _rel(theirs(x), sae(x)[0]) <= 1e-5
        assert _rel(theirs.encode(x), sae.encode(x)) <= 1e-5
    ours, info = load_sae(tmp_path)  # and fastedit still rebuilds its exact variant
    assert ours.cfg.arch == arch and info.model_name == "smollm2-135m" and (info.layer, info.site) == (3, "mlp_out")


def _saelens_sae(kind: str, *, apply_b_dec: bool = True, rescale: bool = False, **cfg_kw):
    torch.manual_seed(1)
    meta = SAEMetadata(model_name="gpt2", hook_name="blocks.2.hook_resid_post", context_size=64, prepend_bos=True)
    common = {"d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": apply_b_dec, "metadata": meta, **cfg_kw}
    if kind == "standard":
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**common))
    elif kind == "topk":
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(k=5, rescale_acts_by_decoder_norm=rescale, **common))
    else:
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.2)  # decoder rows of unequal norm
        if kind == "jumprelu":
            sae.threshold.uniform_(0.0, 0.5)
    return sae.eval()


@pytest.mark.parametrize(
    ("kind", "apply_b_dec", "rescale"),
    [
        ("standard", True, False),
        ("standard", False, False),
        ("topk", True, False),
        ("topk", True, True),
        ("topk", False, True),
        ("jumprelu", True, False),
        ("jumprelu", False, False),
    ],
)
def test_fastedit_loads_saelens_saes(tmp_path, kind, apply_b_dec, rescale):
    theirs = _saelens_sae(kind, apply_b_dec=apply_b_dec, rescale=rescale)
    theirs.save_model(tmp_path)
    ours, info = load_sae(tmp_path)
    assert (info.layer, info.site, info.model_name, info.context_size) == (2, "resid_post", "gpt2", 64)
    x = torch.randn(64, D_IN)
    with torch.no_grad():
        z_theirs, z_ours = theirs.encode(x), ours.encode(x)
        assert _rel(ours(x)[0], theirs(x)) <= 1e-5
        assert torch.equal(z_theirs > 0, z_ours > 0)  # the same features fire
        if not rescale:  # with rescaling, SAELens' z is in units of the un-normalised decoder rows
            assert _rel(z_ours, z_theirs) <= 1e-5


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
        ({"reshape_activations": "hook_z"}, "per-head"),
        ({"architecture": "gated"}, "unknown SAE layout"),
        ({"metadata": {"hook_name": "blocks.2.attn.hook_z"}}, "hook_name"),
        ({"metadata": {"hook_name": "blocks.0.hook_resid_pre"}}, "embeddings"),
    ],
)
def test_settings_fastedit_cannot_honour_are_refused(tmp_path, edit, match):
    _saelens_sae("standard").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    meta = edit.pop("metadata", {})
    cfg.update(edit)
    cfg["metadata"].update(meta)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=match):
        load_sae(tmp_path)


def test_hook_names_map_through_the_registry():
    assert parse_hook("blocks.5.hook_resid_pre") == (4, "resid_post")
    assert parse_hook("blocks.5.hook_mlp_out") == (5, "mlp_out")
    assert parse_hook("model.layers.7") == (7, "resid_post")
    assert parse_hook("model.layers.7.mlp") == (7, "mlp_out")
    assert parse_hook("transformer.h.2.mlp") == (2, "mlp_out")
    assert parse_hook("model.language_model.layers.3") == (3, "resid_post")
    with pytest.raises(SAEFormatError, match="not supported"):
        parse_hook("model.layers.7.self_attn")
