"""THE layer-hook registry: one `ArchSpec` per ``config.model_type``.

This is the only module in fastedit that knows where a model family keeps its modules. To support a new
family, build an `ArchSpec` and call `register_arch(spec)` (or add it to `_BUILTIN` below).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from fastedit.arch.spec import ArchSpec
from fastedit.errors import UnknownArchitectureError


def _decoder(model_type: str, prefix: str = "model", **overrides: Any) -> ArchSpec:
    """The Llama-style layout shared by most current decoders (gate/up/down MLP, o_proj, RMSNorm)."""
    layer = f"{prefix}.layers.{{i}}"
    spec = ArchSpec(
        model_type=model_type,
        block=layer,
        mlp=f"{layer}.mlp",
        mlp_in=(f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"),
        mlp_out=f"{layer}.mlp.down_proj",
        attn_out=f"{layer}.self_attn.o_proj",
        final_norm=f"{prefix}.norm",
        lm_head="lm_head",
        embed=f"{prefix}.embed_tokens",
        layers=f"{prefix}.layers",
    )
    return replace(spec, **overrides)


_GPT2 = ArchSpec(
    model_type="gpt2",
    block="transformer.h.{i}",
    mlp="transformer.h.{i}.mlp",
    mlp_in=("transformer.h.{i}.mlp.c_fc",),
    mlp_out="transformer.h.{i}.mlp.c_proj",
    attn_out="transformer.h.{i}.attn.c_proj",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    embed="transformer.wte",
    layers="transformer.h",
    conv1d_weights=True,
)

_GPTJ = ArchSpec(
    model_type="gptj",
    block="transformer.h.{i}",
    mlp="transformer.h.{i}.mlp",
    mlp_in=("transformer.h.{i}.mlp.fc_in",),
    mlp_out="transformer.h.{i}.mlp.fc_out",
    attn_out="transformer.h.{i}.attn.out_proj",
    final_norm="transformer.ln_f",
    lm_head="lm_head",
    embed="transformer.wte",
    layers="transformer.h",
    parallel_attn_mlp=True,
)

_GPT_NEOX = ArchSpec(
    model_type="gpt_neox",
    block="gpt_neox.layers.{i}",
    mlp="gpt_neox.layers.{i}.mlp",
    mlp_in=("gpt_neox.layers.{i}.mlp.dense_h_to_4h",),
    mlp_out="gpt_neox.layers.{i}.mlp.dense_4h_to_h",
    attn_out="gpt_neox.layers.{i}.attention.dense",
    final_norm="gpt_neox.final_layer_norm",
    lm_head="lm_head",  # "embed_out" before transformers 5
    embed="gpt_neox.embed_in",
    layers="gpt_neox.layers",
    parallel_attn_mlp=True,
    parallel_config_key="use_parallel_residual",
)

_PHI = ArchSpec(
    model_type="phi",
    block="model.layers.{i}",
    mlp="model.layers.{i}.mlp",
    mlp_in=("model.layers.{i}.mlp.fc1",),
    mlp_out="model.layers.{i}.mlp.fc2",
    attn_out="model.layers.{i}.self_attn.dense",
    final_norm="model.final_layernorm",
    lm_head="lm_head",
    embed="model.embed_tokens",
    layers="model.layers",
    parallel_attn_mlp=True,
)

_GEMMA_POST_NORM = "model.layers.{i}.post_feedforward_layernorm"

_BUILTIN: tuple[ArchSpec, ...] = (
    _GPT2,
    _GPTJ,
    _GPT_NEOX,
    _PHI,
    _decoder("llama"),
    _decoder("mistral"),
    _decoder("qwen2"),
    _decoder("qwen3"),
    _decoder("phi3", mlp_in=("model.layers.{i}.mlp.gate_up_proj",)),
    _decoder("gemma"),
    _decoder("gemma2", post_mlp_norm=_GEMMA_POST_NORM),
    _decoder("gemma3_text", post_mlp_norm=_GEMMA_POST_NORM),
    # Gemma3ForConditionalGeneration: the text decoder sits under model.language_model; sizes in text_config.
    _decoder(
        "gemma3",
        prefix="model.language_model",
        post_mlp_norm="model.language_model.layers.{i}.post_feedforward_layernorm",
        text_config_key="text_config",
    ),
)

_REGISTRY: dict[str, ArchSpec] = {spec.model_type: spec for spec in _BUILTIN}


def register_arch(spec: ArchSpec, *, overwrite: bool = False) -> None:
    """Add a family to the registry (e.g. ``register_arch(replace(get_arch("llama"), model_type="olmo"))``)."""
    if spec.model_type in _REGISTRY and not overwrite:
        raise ValueError(f"model_type {spec.model_type!r} is registered already; pass overwrite=True")
    _REGISTRY[spec.model_type] = spec


def known_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_arch(model_type: str) -> ArchSpec:
    """The spec for ``model_type``; an unknown one fails with the known list and how to register one."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"model_type {model_type!r} is not in fastedit's layer registry (known: "
            f"{', '.join(known_model_types())}). Register it with "
            "fastedit.arch.register_arch(ArchSpec(model_type=..., block=..., mlp_out=..., ...))."
        ) from None


def arch_for(model_or_config: Any) -> ArchSpec:
    """The spec of a model (or its config), by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise UnknownArchitectureError(
            "the model's config has no model_type; set config.model_type to one of "
            f"{', '.join(known_model_types())} or register a spec"
        )
    return get_arch(model_type)
