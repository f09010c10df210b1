"""Shared fixtures: tiny random models of every family, and the two real packaged models (marker `real`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import FAMILIES, tiny_model, tiny_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
COUNTERFACT = SHARED / "data" / "counterfact" / "counterfact-edit.json"
COUNTERFACT_ORIGINAL = SHARED / "data" / "counterfact" / "counterfact-original-sample.json"
ZSRE = SHARED / "data" / "zsre" / "zsre_mend_train-1k.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(params=FAMILIES)
def family_model(request):
    """(model_type, tiny model) for every registered family."""
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, loaded once per session."""
    from fastedit.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """(model, tokenizer) of the real Gemma 3 270M, loaded once per session."""
    from fastedit.models import load_model

    return load_model("gemma3-270m")
