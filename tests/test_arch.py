"""The registry resolves every template of every family and reports sizes and flags correctly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import D_K, D_MODEL, FAMILIES, N_LAYERS, head_input_contiguity, tiny_config, tiny_model

from fastedit.arch import ArchSpec, arch_for, get_arch, known_model_types, mlp_out_matrix, register_arch
from fastedit.arch.describe import describe_registry, model_layout
from fastedit.arch.forward import last_logits_only
from fastedit.errors import UnknownArchitectureError

REQUIRED = {
    "gpt2",
    "gptj",
    "gpt_neox",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
}


def test_registry_covers_required_families():
    assert set(known_model_types()) >= REQUIRED


def test_every_template_resolves(family_model):
    model_type, model = family_model
    spec = arch_for(model)
    assert spec.model_type == model_type
    assert len(model.get_submodule(spec.layers)) == spec.n_layers(model.config) == N_LAYERS
    for layer in range(N_LAYERS):
        for kind in ("block", "mlp", "mlp_out", "attn_out"):
            assert isinstance(spec.module(model, kind, layer), torch.nn.Module)
        assert all(model.get_submodule(p) is not None for p in spec.paths("mlp_in", layer))
        if spec.post_mlp_norm:
            assert model.get_submodule(spec.path("post_mlp_norm", layer)) is not None
    for kind in ("final_norm", "lm_head", "embed"):
        assert isinstance(spec.module(model, kind), torch.nn.Module)
    # The oriented editable matrix is (d_model, d_k) for Linear and Conv1D alike.
    assert tuple(mlp_out_matrix(model, spec, 1).shape) == (D_MODEL, D_K)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_sizes_from_config(model_type):
    config = tiny_config(model_type)
    layout = model_layout(config)
    assert (layout["n_layers"], layout["d_model"], layout["d_k"]) == (N_LAYERS, D_MODEL, D_K)
    assert layout["post_mlp_norm"] == (model_type in {"gemma2", "gemma3_text", "gemma3"})
    assert layout["conv1d_weights"] == (model_type == "gpt2")
    assert layout["parallel_attn_mlp"] == (model_type in {"gptj", "gpt_neox", "phi"})


def test_gpt2_default_inner_width_is_four_times_d_model():
    config = tiny_config("gpt2")
    config.n_inner = None
    assert get_arch("gpt2").d_k(config) == 4 * D_MODEL


def test_unknown_model_type_lists_known_and_how_to_register():
    with pytest.raises(UnknownArchitectureError) as info:
        get_arch("mamba")
    message = str(info.value)
    assert "mamba" in message and "llama" in message and "register_arch" in message


def test_config_without_model_type_is_a_clear_error():
    class Bare:
        model_type = ""

    with pytest.raises(UnknownArchitectureError, match="no model_type"):
        arch_for(Bare())


def test_register_new_family():
    spec = dataclasses.replace(get_arch("llama"), model_type="olmo_test")
    register_arch(spec)
    assert get_arch("olmo_test") is spec
    with pytest.raises(ValueError, match="registered already"):
        register_arch(spec)


def test_describe_registry_names_every_family():
    text = describe_registry()
    for model_type in REQUIRED:
        assert f"\n{model_type}" in "\n" + text
    assert isinstance(get_arch("gpt2"), ArchSpec)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [1, 2])
def test_last_logits_reach_the_head_as_a_contiguous_copy(family, n):
    """`last_logits_only` keeps the logits of the last n positions, equal to the full forward's, and hands the LM
    head a contiguous tensor: a strided (rows, n, d) view of the wider hidden states sends the CPU's linear down a
    path 10-15x slower on a large vocabulary."""
    model = tiny_model(family)
    ids = torch.randint(3, 50, (3, 6))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with head_input_contiguity(model) as seen:
            kept = model(input_ids=ids, **last_logits_only(model, n)).logits
    assert seen == [True]
    assert kept.shape == (3, n, full.shape[-1])
    torch.testing.assert_close(kept, full[:, -n:], rtol=1e-5, atol=1e-5)
