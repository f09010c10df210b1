"""Model loading: local folders, bad input (unknown alias, missing path, bad config, unsupported GGUF, offline)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from fastedit.errors import ModelLoadError
from fastedit.models import cache_dir, load_config, load_model, model_name, resolve_source


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_load_local_folder(tiny_folder):
    model, tokenizer = load_model(str(tiny_folder))
    assert model.config.model_type == "llama"
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None
    assert model_name(model) == str(tiny_folder)
    reference = tiny_model("llama")
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    assert load_config(str(tiny_folder)).intermediate_size == 40


def test_dtype_passes_through(tiny_folder):
    model, _ = load_model(str(tiny_folder), dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64


def test_unknown_alias_names_the_input_and_the_aliases():
    with pytest.raises(ModelLoadError, match=r"unknown model 'gemma-99'.*smollm2-135m"):
        resolve_source("gemma-99")


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("missing-model.gguf")


def test_folder_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelLoadError, match="no model_type"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_config(str(tmp_path))


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "weird.gguf"
    writer = gguf.GGUFWriter(str(path), arch="weirdnet")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"weird\.gguf"):
        load_model(str(path))


def test_uncached_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_config("fastedit-test-org/not-a-model")
    # Bounded probe instead of a retry loop (the target is < 2 s; the bound here allows for a loaded machine).
    assert time.perf_counter() - start < 10


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTEDIT_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path


def test_hub_alias_resolves_to_repo_id():
    src = resolve_source("gemma-2b")
    assert (src.kind, src.location) == ("hub", "google/gemma-2b")


def test_device_and_dtype_are_checked_before_loading():
    import torch

    from fastedit.errors import ConfigError
    from fastedit.models import placement

    assert placement("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert placement(None, None)[1] == torch.float32
    with pytest.raises(ConfigError, match="not a device"):
        placement("gpu0")
    with pytest.raises(ConfigError, match="dtype"):
        placement("cpu", "int8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no such CUDA device"):
            placement("cuda")


@pytest.mark.parametrize("left", [["model.safetensors"], ["config.json", "fastedit_source.json"]])
def test_an_incomplete_converted_folder_is_converted_again(monkeypatch, tmp_path, left):
    """A converted folder missing its files (e.g. lost in a crash) must not block every later load."""
    import fastedit.models as models

    monkeypatch.setenv("FASTEDIT_CACHE_DIR", str(tmp_path))
    conversions = []

    def parse(path, dtype):  # stands in for the GGUF parse; the folder handling under test is the real one
        conversions.append(path)
        return tiny_model("llama"), tiny_tokenizer()

    monkeypatch.setattr(models, "packaged_gguf", lambda alias: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "_load_gguf", parse)
    folder = models._converted_folder("smollm2-135m")
    folder.mkdir(parents=True)
    for name in left:  # what a crash can leave: the folder, not all its files
        (folder / name).write_bytes(b"")

    assert load_config("smollm2-135m").intermediate_size == 40
    assert len(conversions) == 1
    assert (folder / "config.json").is_file() and (folder / models.SOURCE_RECORD).is_file()
    assert load_config("smollm2-135m").intermediate_size == 40  # complete now: read, not converted again
    assert len(conversions) == 1
