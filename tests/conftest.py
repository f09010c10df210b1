"""Shared fixtures: tiny random models of every family, generic text, the data sets, and the two real packaged
models (marker `real`).

Data sets come from the data directory (`fastedit data`, $FASTEDIT_DATA); a test needing a missing one is skipped
with the command that adds it. Tests of logic read `text_corpus`, a generated text file, so they never need data.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from tiny_models import FAMILIES, TEXT, tiny_model, tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path_factory, monkeypatch) -> None:
    """Tests of logic write statistics, targets and samples into a cache of their own, never the user's; the data
    directory stays the user's. Real-model tests keep the user's cache (the converted packaged models live there)."""
    if request.node.get_closest_marker("real") is not None:
        return
    from fastedit.data import DATA_ENV, data_dir
    from fastedit.models import CACHE_ENV

    monkeypatch.setenv(DATA_ENV, str(data_dir()))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path_factory.getbasetemp() / "fastedit-cache"))


def benchmark_module(name: str):
    """Import ``benchmarks/<name>.py`` (its sibling modules importable while it loads), for tests of its logic."""
    import importlib
    import sys

    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)


def data_set(name: str) -> Path:
    """The file of data set ``name`` from the data directory, or skip the test saying how to add it."""
    from fastedit.data import find_dataset

    path = find_dataset(name)
    if path is None:
        pytest.skip(f"data set {name} not available: fastedit data add {name} FILE")
    return path


@pytest.fixture(scope="session")
def counterfact() -> Path:
    return data_set("counterfact")


@pytest.fixture(scope="session")
def counterfact_original() -> Path:
    return data_set("counterfact-original")


@pytest.fixture(scope="session")
def zsre() -> Path:
    return data_set("zsre")


@pytest.fixture(scope="session")
def wikitext() -> Path:
    return data_set("wikitext-2")


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A ~120 kB plain-text file of seeded shuffled sentences (paragraphs split by blank lines)."""
    rng = random.Random(0)
    sentences = [s.strip() + "." for s in TEXT.replace("\n", " ").split(".") if s.strip()]
    paragraphs = [" ".join(rng.choice(sentences) for _ in range(rng.randint(3, 12))) for _ in range(1200)]
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


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
