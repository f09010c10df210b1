"""Calling a model's forward with a key/value cache and last-position logits, across the transformers versions
fastedit supports."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from fastedit.arch.weights import model_device


def cache_kwargs(model: torch.nn.Module, cache: DynamicCache) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)``: transformers renamed ``past_key_values`` to ``cache`` (5.2x; the old
    name is deprecated there and unknown before)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def last_logits_only(model: torch.nn.Module, n: int = 1) -> dict[str, Any]:
    """Forward kwargs that compute the LM head at each row's last ``n`` positions only, where the model supports it
    (the head is 262k wide on Gemma: at every position it costs more than the rest of a short forward).

    The positions go in as a 1-D index tensor, not as the int ``n``: transformers turns an int into a strided view
    of the hidden states, and on the CPU a linear layer over a (rows, n, d) view of a wider (rows, width, d) tensor
    runs 10-15x slower than over a contiguous copy (Gemma's 262k x 640 head, 256 rows of width 9, one thread: 15.5 s
    against 1.0 s); an index tensor makes the model gather that copy."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return {}
    return {"logits_to_keep": torch.arange(-n, 0, device=model_device(model))}
