"""Patches out of fastedit: model folders (apply/revert), peft LoRA adapters, GGUF copies, and their CLI."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from fastedit.arch import arch_for, mlp_out_param, restore_mlp_out, snapshot_mlp_out
from fastedit.cli import cli
from fastedit.editing.patch import apply_patch, make_patch
from fastedit.errors import PatchError
from fastedit.export import apply_to_folder, export_patch, revert_to_folder, write_edited_gguf

PROMPTS = ["The Eiffel Tower is located in", "Michael Jordan plays"]


def _saved(tmp_path, family: str):
    """A tiny model saved as a folder (the --model of the export commands) and its in-memory twin."""
    model, tok = tiny_model(family), tiny_tokenizer()
    folder = tmp_path / f"base-{family}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, str(folder)


def _patch(model, layers_ranks: dict[int, int], scale: float = 0.5, seed: int = 0):
    """A patch of random factors at several ranks: large enough to change the model's outputs."""
    spec = arch_for(model)
    gen = torch.Generator().manual_seed(seed)
    d_model, d_k = spec.d_model(model.config), spec.d_k(model.config)
    factors = {
        layer: (torch.randn(d_model, r, generator=gen) * scale, torch.randn(d_k, r, generator=gen) * scale)
        for layer, r in layers_ranks.items()
    }
    return make_patch(
        model, factors, snapshot_mlp_out(model, arch_for(model), sorted(factors)), method="memit", model="tiny"
    )


def _logits(model, tok) -> torch.Tensor:
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_adapter_on_the_unedited_model_gives_the_edited_outputs(tmp_path, family):
    PeftModel = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[interop]')").PeftModel

    model, tok, folder = _saved(tmp_path, family)
    patch = _patch(model, {0: 2, 2: 3})  # two ranks: the adapter needs a per-module rank
    base_logits = _logits(model, tok)
    apply_patch(model, patch)
    edited_logits = _logits(model, tok)
    assert (edited_logits - base_logits).abs().max() > 1e-2  # the edit matters

    export_patch(patch, folder, tmp_path / "adapter", format="peft")
    base = AutoModelForCausalLM.from_pretrained(folder).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (_logits(peft_model, tok) - edited_logits).abs().max() <= 1e-4
    merged = peft_model.merge_and_unload()  # merging gives fastedit's edited weights
    for layer in patch.layers:
        spec = arch_for(model)
        assert torch.allclose(mlp_out_param(merged, spec, layer), mlp_out_param(model, spec, layer), atol=1e-5)


def test_apply_and_revert_write_plain_transformers_folders(tmp_path):
    model, _, folder = _saved(tmp_path, "llama")
    patch = _patch(model, {1: 2})
    original = snapshot_mlp_out(model, arch_for(model), [1])[1]
    apply_to_folder(patch, folder, tmp_path / "edited")
    apply_patch(model, patch)
    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    spec = arch_for(model)
    assert torch.equal(mlp_out_param(edited, spec, 1), mlp_out_param(model, spec, 1))
    revert_to_folder(patch, str(tmp_path / "edited"), tmp_path / "restored")
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "restored")
    assert torch.equal(mlp_out_param(restored, spec, 1), original)  # bit-exact
    with pytest.raises(PatchError, match="already exists"):
        apply_to_folder(patch, folder, tmp_path / "edited")
    apply_to_folder(patch, folder, tmp_path / "edited", dtype="bfloat16", overwrite=True)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype="auto")
    assert mlp_out_param(half, spec, 1).dtype == torch.bfloat16


def test_patch_and_export_commands(tmp_path):
    pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[interop]')")
    model, _, folder = _saved(tmp_path, "llama")
    path = _patch(model, {0: 1, 2: 2}).save(tmp_path / "p.safetensors")
    runner = CliRunner()
    res = runner.invoke(cli, ["patch", "show", str(path)])
    assert res.exit_code == 0 and "layer 2: rank 2" in res.output and "method: memit" in res.output
    res = runner.invoke(cli, ["patch", "apply", str(path), "--model", folder, "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        cli, ["patch", "revert", str(path), "--model", str(tmp_path / "e"), "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 0, res.output
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    assert torch.equal(mlp_out_param(restored, arch_for(model), 2), mlp_out_param(model, arch_for(model), 2))
    res = runner.invoke(cli, ["export", str(path), "--model", folder, "--out", str(tmp_path / "a"), "--format", "peft"])
    assert res.exit_code == 0 and (tmp_path / "a" / "adapter_config.json").is_file()
    res = runner.invoke(cli, ["export", str(path), "--model", folder, "--out", str(tmp_path / "g"), "--format", "gguf"])
    assert res.exit_code == 1 and "error: --format gguf copies the model's GGUF file" in res.output
    other = _patch(tiny_model("llama", seed=1), {0: 1}).save(tmp_path / "other.safetensors")
    res = runner.invoke(
        cli, ["export", str(other), "--model", folder, "--out", str(tmp_path / "x"), "--format", "peft"]
    )
    assert res.exit_code == 1 and "was made for" in res.output and not (tmp_path / "x").exists()


def _tiny_gguf(path, qtype_name: str) -> dict:
    """A GGUF with two ffn_down tensors (d_model 24 × d_k 256: rows of whole quantisation blocks) and metadata;
    returns the tensors as stored (dequantised). Q6_K, which gguf-py reads but cannot write, gets random blocks."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    qtype = GGMLQuantizationType[qtype_name]
    gen = np.random.default_rng(0)
    stored = {}
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_string("general.name", "tiny")
    for i in range(2):
        w = gen.standard_normal((24, 256)).astype(np.float32)
        if qtype == GGMLQuantizationType.F32:
            data = w
        elif qtype == GGMLQuantizationType.Q6_K:  # 210-byte blocks: 208 bytes of quants/scales, then f16 d
            blocks = gen.integers(0, 256, (24, 210), dtype=np.uint8)
            blocks[:, 208:] = np.full((24, 1), 0.01, np.float16).view(np.uint8)
            data = blocks
        else:
            data = quants.quantize(w, qtype)
        writer.add_tensor(f"blk.{i}.ffn_down.weight", data, raw_dtype=None if qtype_name == "F32" else qtype)
        stored[f"blk.{i}.ffn_down.weight"] = quants.dequantize(data, qtype)
    writer.add_tensor("token_embd.weight", gen.standard_normal((10, 24)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.mark.parametrize(("qtype", "stored"), [("Q8_0", "Q8_0"), ("Q4_1", "Q4_1"), ("F32", "F32"), ("Q6_K", "F32")])
def test_gguf_copy_replaces_only_the_edited_tensor(tmp_path, qtype, stored):
    import numpy as np
    from gguf import GGUFReader, quants

    from fastedit.editing.patch import Patch

    before = _tiny_gguf(tmp_path / "src.gguf", qtype)
    patch = Patch({1: (torch.randn(24, 2), torch.randn(256, 2))}, {1: torch.zeros(24, 256)}, {})
    types = write_edited_gguf(patch, tmp_path / "src.gguf", tmp_path / "out.gguf", lambda i: f"blk.{i}.ffn_down.weight")
    assert types == {"blk.1.ffn_down.weight": stored}
    src, out = GGUFReader(str(tmp_path / "src.gguf")), GGUFReader(str(tmp_path / "out.gguf"))
    assert out.fields["general.name"].contents() == "tiny" and out.fields["llama.block_count"].contents() == 2
    tensors = {t.name: t for t in out.tensors}
    for t in src.tensors:
        if t.name != "blk.1.ffn_down.weight":
            assert np.array_equal(tensors[t.name].data, t.data)  # untouched tensors are copied byte for byte
    edited = tensors["blk.1.ffn_down.weight"]
    got = quants.dequantize(edited.data, edited.tensor_type)
    want = before["blk.1.ffn_down.weight"] + patch.delta(1).numpy()
    err = np.linalg.norm(got - want) / np.linalg.norm(patch.delta(1).numpy())
    assert err < {"F32": 1e-6, "Q8_0": 0.02, "Q4_1": 0.3}[stored]


@pytest.mark.real
def test_smollm2_exports_peft_and_gguf_with_the_edit_intact(smollm2, tmp_path):
    """A rank-2 patch on three layers (ΔW entries ~0.03, a few Q4_1 steps), exported as GGUF and peft."""
    import numpy as np

    PeftModel = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[interop]')").PeftModel
    from transformers import AutoModelForCausalLM as Auto

    from fastedit.models import load_model, packaged_gguf

    model, tok = smollm2
    spec = arch_for(model)
    layers = [4, 5, 6]
    original = snapshot_mlp_out(model, arch_for(model), layers)
    gen = torch.Generator().manual_seed(0)
    d_model, d_k = spec.d_model(model.config), spec.d_k(model.config)
    factors = {
        l: (torch.randn(d_model, 2, generator=gen) * 0.15, torch.randn(d_k, 2, generator=gen) * 0.15) for l in layers
    }
    patch = make_patch(model, factors, original, method="memit", model="smollm2-135m")
    path = patch.save(tmp_path / "p.safetensors")
    try:
        apply_patch(model, patch)
        edited = _logits(model, tok)
        edited_w = {l: mlp_out_param(model, spec, l).detach().clone() for l in layers}
    finally:
        restore_mlp_out(model, arch_for(model), original)

    out = export_patch(path, "smollm2-135m", tmp_path / "smollm2.gguf", format="gguf")
    src = packaged_gguf("smollm2-135m")
    assert np.isclose(out.stat().st_size, src.stat().st_size, rtol=0.01)  # re-quantised (Q4_1), not F32
    loaded, _ = load_model(str(out))
    for l in layers:
        delta = patch.delta(l)
        change = mlp_out_param(loaded, spec, l) - original[l]
        kept = float((change * delta).sum() / delta.norm() ** 2)  # share of ΔW along ΔW after re-quantising
        noise = float((change - delta).norm() / delta.norm())
        print(f"layer {l}: Q4_1 re-quantised edit keeps {kept:.3f} of ΔW, error ‖·‖/‖ΔW‖ = {noise:.3f}")
        assert 0.8 < kept < 1.2
    del loaded
    exact = export_patch(path, "smollm2-135m", tmp_path / "f32.gguf", format="gguf", requantize=False)
    hf = Auto.from_pretrained(str(exact.parent), gguf_file=exact.name)  # transformers' own GGUF reader
    for l in layers:
        assert torch.allclose(mlp_out_param(hf, spec, l), edited_w[l], atol=1e-6)
    del hf

    export_patch(path, "smollm2-135m", tmp_path / "adapter", format="peft")
    base, _ = load_model("smollm2-135m")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (_logits(peft_model, tok) - edited).abs().max() <= 1e-4
