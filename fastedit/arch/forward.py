"""Calling a model's forward with a key/value cache, across the transformers versions fastedit supports."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache


def cache_kwargs(model: torch.nn.Module, cache: DynamicCache) -> dict[str, Any]:
    """``{name: cache}`` for ``model(...)``: transformers renamed ``past_key_values`` to ``cache`` (5.2x; the old
    name is deprecated there and unknown before)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}
