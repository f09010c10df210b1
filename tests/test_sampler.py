"""The model sampler: seeded, independent of batching, cached and extended, top-k/top-p without a full sort."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from fastedit.stats import sampler
from fastedit.stats.sampler import SamplerConfig, pick_tokens, sample_rows, sampled_rows

CFG = SamplerConfig(row_tokens=12, batch_rows=4)


def test_rows_are_seeded_and_do_not_depend_on_their_batch():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    a = sample_rows(model, tok, range(0, 6), 0, CFG, show=False)
    assert a.shape == (6, 12)
    assert torch.equal(a, sample_rows(model, tok, range(0, 6), 0, CFG, show=False))
    assert torch.equal(a[3:], sample_rows(model, tok, range(3, 6), 0, CFG, show=False))  # other batch mates
    assert not torch.equal(a, sample_rows(model, tok, range(0, 6), 1, CFG, show=False))
    special = set(tok.all_special_ids)
    assert not any(int(t) in special for t in a[:, 1:].flatten())  # no EOS/pad/BOS inside a row


def test_rows_per_forward_change_speed_not_samples():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    together = sample_rows(model, tok, range(0, 7), 0, CFG, show=False)  # one forward of 7 rows
    chunked = sample_rows(model, tok, range(0, 7), 0, replace(CFG, forward_rows=3), show=False)  # 3 forwards
    assert torch.equal(together, chunked)


def test_pick_tokens_keeps_to_top_k_and_top_p():
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, -1.0]] * 200)
    u = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picked = pick_tokens(logits, u, SamplerConfig(top_k=2, top_p=1.0))
    assert set(picked.tolist()) == {1, 2}
    assert set(pick_tokens(logits, u, SamplerConfig(top_k=5, top_p=0.1)).tolist()) == {1}  # top-1 mass > 0.1


def test_sampled_rows_are_cached_and_extended_not_regenerated(tmp_path, monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    calls = []
    real = sampler.sample_rows

    def counting(model, tok, rows, *a, **k):
        calls.append(rows)
        return real(model, tok, rows, *a, **k)

    monkeypatch.setattr(sampler, "sample_rows", counting)
    first = sampled_rows(model, tok, 30, cfg=CFG, folder=tmp_path)  # 3 rows, the last cut to 6 tokens
    assert [len(r) for r in first] == [12, 12, 6] and calls == [range(0, 3)]
    again = sampled_rows(model, tok, 30, cfg=CFG, folder=tmp_path)
    assert calls == [range(0, 3)] and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    more = sampled_rows(model, tok, 60, cfg=CFG, folder=tmp_path)
    assert calls[-1] == range(3, 5) and torch.equal(more[1], first[1])
    other_model = tiny_model("llama", seed=1)
    sampled_rows(other_model, tok, 30, cfg=CFG, folder=tmp_path)
    assert calls[-1] == range(0, 3)  # another checkpoint of the same architecture gets its own samples
    assert len(list(tmp_path.iterdir())) == 2


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_sampler_runs_on_other_families(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    assert sample_rows(model, tok, range(2), 0, CFG, show=False).shape == (2, 12)
