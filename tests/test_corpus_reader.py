"""One corpus reader for precompute, SAE training/eval and unlearning: formats, metadata files, early validation."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from fastedit.sae.activations import read_corpus
from fastedit.stats import ensure_stats
from fastedit.stats.corpus import check_corpus, local_corpus
from fastedit.stats.errors import CorpusError

SMALL = {"seq_len": 32, "batch_tokens": 128, "progress": False}
TEXTS = [f"Fact number {i}: the tower is in Paris and the museum is in Rome." for i in range(30)]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _saved_dataset(tmp_path, *, as_dict: bool = False, texts: list[str] = TEXTS):
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    path = tmp_path / "saved"
    (datasets.DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("as_dict", [False, True])
def test_save_to_disk_folder_feeds_precompute(tmp_path, as_dict):
    path = _saved_dataset(tmp_path, as_dict=as_dict)
    docs = sorted(local_corpus(str(path)).documents(0))
    assert docs == sorted(TEXTS)  # the text column, no JSON metadata, no ids
    model, tok = tiny_model("llama"), tiny_tokenizer()
    stats = ensure_stats(model, tok, [0], dm=2, corpus=str(path), out=tmp_path / "o", **SMALL)
    assert stats[0].count == 80 and stats[0].metadata["corpus"].startswith("dataset:")


def test_save_to_disk_folder_trains_an_sae(tmp_path):
    from fastedit.sae.api import train_sae
    from fastedit.sae.io import load_sae

    path = _saved_dataset(tmp_path, texts=TEXTS * 10)  # held out: every 10th document, 30 of them
    model, tok = tiny_model("llama"), tiny_tokenizer()
    res = train_sae(
        model, 1, tmp_path / "sae", tokenizer=tok, arch="topk", width=32, tokens=600, corpus=str(path), k=4,
        batch_size=64, epochs=1, buffer_size=256, eval_tokens=300, ce_windows=0, activation_cache=tmp_path / "acts",
    )  # fmt: skip
    assert res["train"]["steps"] > 0
    _, info = load_sae(tmp_path / "sae")
    assert info.dataset_path == str(path)


def test_hub_snapshot_folder_skips_readme_and_metadata(tmp_path):
    folder = tmp_path / "snapshot"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# Dataset card SECRET-README\n")
    (folder / "LICENSE.txt").write_text("MIT License SECRET-LICENSE")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.txt").write_text("SECRET-CACHE")
    docs = list(local_corpus(str(folder)).documents(0))
    assert sorted(docs) == sorted(TEXTS)


def test_sae_corpus_is_parsed_text_not_raw_bytes(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "meta": "IGNORED"}) for t in TEXTS))
    train, held = read_corpus(path, part="train"), read_corpus(path, part="heldout")
    assert "IGNORED" not in train + held and '"text"' not in train + held
    train_docs, held_docs = set(train.split("\n")), set(held.split("\n"))
    assert len(held_docs) == 3 and not train_docs & held_docs and train_docs | held_docs == set(TEXTS)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("missing.jsonl", None, "does not exist"),
        ("bad.jsonl", "{not json\n", "not valid JSON"),
        ("empty.txt", "\n\n", "contains no text"),
        ("data.csv", "a,b", "unknown corpus format"),
    ],
)
def test_bad_corpus_fails_before_the_model_loads(tmp_path, monkeypatch, name, content, match):
    import fastedit.models
    from fastedit.sae.api import train_sae
    from fastedit.stats.command import precompute

    path = tmp_path / name
    if content is not None:
        path.write_text(content)

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the corpus was checked")

    monkeypatch.setattr(fastedit.models, "load_model", no_load)
    monkeypatch.setattr("fastedit.sae.api.load_model", no_load)
    with pytest.raises(CorpusError, match=match):
        check_corpus(str(path))
    with pytest.raises(CorpusError, match=match):
        precompute("smollm2-135m", corpus=str(path), layers=[0])
    with pytest.raises(CorpusError, match=match):
        train_sae("smollm2-135m", 0, tmp_path / "out", corpus=str(path))
