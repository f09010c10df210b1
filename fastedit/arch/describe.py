"""Human-readable views of the registry and of one model's resolved layout (for `fastedit arch ...`)."""

from __future__ import annotations

from typing import Any

from fastedit.arch.registry import arch_for, get_arch, known_model_types


def describe_registry() -> str:
    lines = []
    for model_type in known_model_types():
        spec = get_arch(model_type)
        flags = [
            name
            for name, on in (
                ("conv1d", spec.conv1d_weights),
                ("parallel", spec.parallel_attn_mlp),
                ("post-mlp-norm", spec.post_mlp_norm is not None),
            )
            if on
        ]
        lines.append(f"{model_type}{'  [' + ', '.join(flags) + ']' if flags else ''}")
        for kind, template in spec.templates().items():
            if template is not None:
                shown = ", ".join(template) if isinstance(template, tuple) else template
                lines.append(f"    {kind:<14} {shown}")
    return "\n".join(lines)


def model_layout(config: Any) -> dict[str, Any]:
    """Resolved facts about a model from its config: family, sizes, flags, module templates."""
    spec = arch_for(config)
    return {
        "model_type": spec.model_type,
        "n_layers": spec.n_layers(config),
        "d_model": spec.d_model(config),
        "d_k": spec.d_k(config),
        "conv1d_weights": spec.conv1d_weights,
        "parallel_attn_mlp": spec.is_parallel(config),
        "post_mlp_norm": spec.post_mlp_norm is not None,
        "modules": spec.templates(),
    }


def describe_model(name: str, *, trust_remote_code: bool = False) -> str:
    from fastedit.models import load_config

    layout = model_layout(load_config(name, trust_remote_code=trust_remote_code))
    lines = [
        f"model          {name}",
        f"model_type     {layout['model_type']}",
        f"layers         {layout['n_layers']}",
        f"d_model        {layout['d_model']}",
        f"d_k            {layout['d_k']}  (key width: input of mlp_out)",
        f"post_mlp_norm  {'yes' if layout['post_mlp_norm'] else 'no'}",
        f"parallel       {'yes' if layout['parallel_attn_mlp'] else 'no'}",
        f"conv1d         {'yes' if layout['conv1d_weights'] else 'no'}",
    ]
    for kind, template in layout["modules"].items():
        if template is not None:
            lines.append(f"{kind:<14} {', '.join(template) if isinstance(template, tuple) else template}")
    return "\n".join(lines)
