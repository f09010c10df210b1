"""Patches: save/apply/revert bit-exact on tiny Linear and Conv1D (GPT-2) models; refusals on other models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import D_K, D_MODEL, tiny_model

from fastedit.arch import arch_for, mlp_out_matrix, snapshot_mlp_out
from fastedit.editing.patch import (
    Patch,
    apply_patch,
    make_patch,
    model_fingerprint,
    revert_patch,
)
from fastedit.errors import PatchError

LAYERS = [0, 2]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, state):
    current = model.state_dict()
    assert current.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(current[key], value), key


def _random_patch(model, rank=3, seed=0, **info):
    g = torch.Generator().manual_seed(seed)
    factors = {l: (torch.randn(D_MODEL, rank, generator=g), torch.randn(D_K, rank, generator=g) * 0.1) for l in LAYERS}
    return make_patch(
        model, factors, snapshot_mlp_out(model, arch_for(model), LAYERS), method="memit", model="tiny", **info
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and GPT-2's transposed Conv1D
def test_save_apply_revert_is_bit_exact(tmp_path, family):
    model = tiny_model(family)
    before = _state(model)
    patch = _random_patch(model, case_ids=["a", "b"], hparams={"layers": LAYERS})
    path = patch.save(tmp_path / "p.safetensors")
    assert not list(tmp_path.glob("*.tmp"))  # written via a temp file, then renamed

    loaded = Patch.load(path)
    assert loaded.layers == LAYERS and loaded.metadata["case_ids"] == ["a", "b"]
    assert loaded.metadata["fingerprint"] == model_fingerprint(model, LAYERS)
    spec = arch_for(model)
    apply_patch(model, path)
    for layer in LAYERS:  # the change is A Bᵀ in the (d_model, d_k) orientation, whatever the storage
        change = mlp_out_matrix(model, spec, layer) - before_matrix(before, model, spec, layer)
        assert torch.allclose(change, loaded.delta(layer), atol=1e-5)
    assert not torch.equal(model.state_dict()[_param_name(model, spec, 0)], before[_param_name(model, spec, 0)])

    revert_patch(model, path)
    _assert_same(model, before)  # every weight, bit for bit
    apply_patch(model, path)  # and it applies again to the restored model
    revert_patch(model, loaded)
    _assert_same(model, before)


def _param_name(model, spec, layer):
    return spec.path("mlp_out", layer) + ".weight"


def before_matrix(state, model, spec, layer):
    weight = state[_param_name(model, spec, layer)]
    return weight.T if spec.conv1d_weights else weight


def test_subtracting_is_not_bit_exact_which_is_why_originals_are_stored():
    model = tiny_model("llama")
    spec = arch_for(model)
    patch = _random_patch(model)
    w0 = mlp_out_matrix(model, spec, 0).clone()
    delta = patch.delta(0)
    assert not torch.equal((w0 + delta) - delta, w0)


def test_refused_on_another_model_and_twice(tmp_path):
    model = tiny_model("llama")
    path = _random_patch(model).save(tmp_path / "p.safetensors")
    other_weights = tiny_model("llama", seed=1)  # same config, other checkpoint
    state = _state(other_weights)
    with pytest.raises(PatchError, match="made for other weights at layer 0"):
        apply_patch(other_weights, path)
    _assert_same(other_weights, state)  # nothing changed
    with pytest.raises(PatchError, match="another model"):
        apply_patch(tiny_model("qwen2"), path)  # other config (same shapes)
    with pytest.raises(PatchError, match=r"has 3 layers|shape"):
        apply_patch(tiny_model("gpt2"), path)
    apply_patch(model, path)
    with pytest.raises(PatchError, match="already carries this patch"):
        apply_patch(model, path)


def test_revert_refused_when_the_patch_is_not_applied(tmp_path):
    model = tiny_model("llama")
    path = _random_patch(model).save(tmp_path / "p.safetensors")
    before = _state(model)
    with pytest.raises(PatchError, match="does not hold the weights"):
        revert_patch(model, path)
    _assert_same(model, before)
    apply_patch(model, path)
    with torch.no_grad():
        mlp_out_matrix(model, arch_for(model), 2)[0, 0] += 1.0  # edited since
    with pytest.raises(PatchError, match=r"layer 2 .* does not hold"):
        revert_patch(model, path)


def test_unreadable_or_foreign_files(tmp_path):
    with pytest.raises(PatchError, match="does not exist"):
        Patch.load(tmp_path / "none.safetensors")
    foreign = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(PatchError, match="not a fastedit patch"):
        Patch.load(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(PatchError, match="cannot read patch"):
        Patch.load(junk)


@pytest.mark.real
def test_smollm2_patch_is_refused_on_gemma(smollm2, gemma3, tmp_path):
    model, _ = smollm2
    spec = arch_for(model)
    d_model, d_k = spec.d_model(model.config), spec.d_k(model.config)
    g = torch.Generator().manual_seed(0)
    factors = {4: (torch.randn(d_model, 1, generator=g) * 1e-3, torch.randn(d_k, 1, generator=g))}
    path = make_patch(
        model, factors, snapshot_mlp_out(model, arch_for(model), [4]), method="memit", model="smollm2-135m"
    ).save(tmp_path / "p.safetensors")
    gemma, _ = gemma3
    before = mlp_out_matrix(gemma, arch_for(gemma), 4).clone()
    with pytest.raises(PatchError, match=r"shape|another model"):
        apply_patch(gemma, path)
    assert torch.equal(mlp_out_matrix(gemma, arch_for(gemma), 4), before)
    state = mlp_out_matrix(model, spec, 4).clone()
    apply_patch(model, path)
    revert_patch(model, path)
    assert torch.equal(mlp_out_matrix(model, spec, 4), state)


def test_revert_data_is_a_small_residue_by_default_and_full_originals_on_request(tmp_path):
    model = tiny_model("llama")
    before, snapshot = _state(model), snapshot_mlp_out(model, arch_for(model), LAYERS)
    small_delta = {l: (a * 1e-3, b) for l, (a, b) in _random_patch(model).factors.items()}
    default = make_patch(model, small_delta, snapshot)
    full = make_patch(model, small_delta, snapshot, store_originals=True)
    huge = make_patch(model, {l: (a * 1000, b) for l, (a, b) in small_delta.items()}, snapshot)  # ΔW >> W
    assert not default.originals and set(full.originals) == set(LAYERS) == set(huge.originals)
    paths = [p.save(tmp_path / f"{i}.safetensors") for i, p in enumerate((default, full, huge))]
    assert paths[0].stat().st_size < paths[1].stat().st_size / 2
    assert paths[2].stat().st_size <= paths[1].stat().st_size  # never larger than the full copy
    for path in paths:
        apply_patch(model, path)
        revert_patch(model, path)
        _assert_same(model, before)


def test_patches_of_the_first_format_still_apply_and_revert(tmp_path):
    """Format 1 stored the full original matrix and no shapes/dtypes in its metadata."""
    import json

    from safetensors import safe_open

    model = tiny_model("llama")
    before = _state(model)
    path = make_patch(
        model, _random_patch(model).factors, snapshot_mlp_out(model, arch_for(model), LAYERS), store_originals=True
    ).save(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fastedit_patch"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = {k: v for k, v in meta.items() if k not in ("shapes", "dtypes", "revert")} | {"format": "fastedit-patch/1"}
    save_file(tensors, str(path), metadata={"fastedit_patch": json.dumps(meta)})
    apply_patch(model, path)
    revert_patch(model, path)
    _assert_same(model, before)
