"""`ArchSpec`: where one model family keeps its layers, MLP, residual stream and head.

Templates are dotted module paths with ``{i}`` standing for the layer index, resolved with
``model.get_submodule``. Nothing outside ``fastedit.arch`` knows a module path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ArchSpec:
    """Module templates and behaviour flags for one ``config.model_type``.

    ``mlp_out`` is the editable matrix W (d_model x d_k once oriented); its *input* is the key k (width d_k).
    """

    model_type: str
    block: str  # residual stream after layer i (the block's output)
    mlp: str
    mlp_in: tuple[str, ...]  # input projection(s): (gate, up) or (fc_in,)
    mlp_out: str  # the editable output projection; its input is the key
    attn_out: str
    final_norm: str
    lm_head: str
    embed: str
    layers: str  # the ModuleList of blocks (its length is the depth)
    # Behaviour flags.
    conv1d_weights: bool = False  # GPT-2 Conv1D stores weight as (in, out): transposed vs nn.Linear
    parallel_attn_mlp: bool = False  # attention and MLP read the same residual (GPT-J, NeoX, Phi)
    parallel_config_key: str | None = None  # config flag that decides parallelism when it varies (NeoX)
    post_mlp_norm: str | None = None  # norm applied to the MLP output before the residual add (Gemma 2/3)
    # Config attribute names (first present wins); text_config_key: sizes live in a sub-config (multimodal).
    n_layers_keys: tuple[str, ...] = ("num_hidden_layers", "n_layer", "num_layers")
    d_model_keys: tuple[str, ...] = ("hidden_size", "n_embd", "d_model")
    d_k_keys: tuple[str, ...] = ("intermediate_size", "n_inner")
    max_positions_keys: tuple[str, ...] = ("max_position_embeddings", "n_positions", "n_ctx")
    d_k_default_multiple: int = 4  # d_k = multiple * d_model when the config leaves it None (GPT-2, GPT-J)
    text_config_key: str | None = None
    # The mlp_out weight's tensor name in llama.cpp GGUF files (the same for every family llama.cpp converts).
    gguf_mlp_out: str | None = "blk.{i}.ffn_down.weight"
    aliases: tuple[str, ...] = field(default=())

    # ---- resolving templates -------------------------------------------------------------------------
    def path(self, kind: str, layer: int | None = None) -> str:
        """The module path of ``kind`` ("block", "mlp", "mlp_out", ...) at ``layer``."""
        template = getattr(self, kind)
        if template is None:
            raise ValueError(f"{self.model_type} has no {kind!r} module")
        if isinstance(template, tuple):
            raise ValueError(f"{kind!r} names several modules; use paths({kind!r}, layer)")
        if "{i}" in template:
            if layer is None:
                raise ValueError(f"{kind!r} is per layer: pass a layer index")
            return template.format(i=layer)
        return template

    def paths(self, kind: str, layer: int) -> tuple[str, ...]:
        template = getattr(self, kind)
        templates = template if isinstance(template, tuple) else (template,)
        return tuple(t.format(i=layer) for t in templates if t is not None)

    def module(self, model: torch.nn.Module, kind: str, layer: int | None = None) -> torch.nn.Module:
        return model.get_submodule(self.path(kind, layer))

    def templates(self) -> dict[str, Any]:
        """The module templates, for display."""
        keys = (
            "block",
            "mlp",
            "mlp_in",
            "mlp_out",
            "attn_out",
            "post_mlp_norm",
            "final_norm",
            "lm_head",
            "embed",
        )
        return {k: getattr(self, k) for k in keys}

    # ---- sizes from a config ---------------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        if self.text_config_key is None:
            return config
        sub = getattr(config, self.text_config_key, None)
        return sub if sub is not None else config

    def _first(self, config: Any, keys: tuple[str, ...]) -> Any:
        cfg = self.text_config(config)
        for key in keys:
            value = getattr(cfg, key, None)
            if value is not None:
                return value
        return None

    def n_layers(self, config: Any) -> int:
        value = self._first(config, self.n_layers_keys)
        if value is None:
            raise ValueError(f"config of {self.model_type} has none of {self.n_layers_keys}")
        return int(value)

    def d_model(self, config: Any) -> int:
        value = self._first(config, self.d_model_keys)
        if value is None:
            raise ValueError(f"config of {self.model_type} has none of {self.d_model_keys}")
        return int(value)

    def d_k(self, config: Any) -> int:
        value = self._first(config, self.d_k_keys)
        return int(value) if value is not None else self.d_k_default_multiple * self.d_model(config)

    def max_positions(self, config: Any) -> int | None:
        """The longest sequence the model takes (None when the config does not say)."""
        value = self._first(config, self.max_positions_keys)
        return int(value) if value is not None else None

    def is_parallel(self, config: Any) -> bool:
        if self.parallel_config_key is not None:
            return bool(getattr(self.text_config(config), self.parallel_config_key, self.parallel_attn_mlp))
        return self.parallel_attn_mlp
