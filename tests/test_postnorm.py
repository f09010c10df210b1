"""Editing through Gemma's post-MLP norm: the reachable-target map and the gain probe."""

from __future__ import annotations

import pytest
import torch
from test_editing_core import UNRELATED, hp_for, key_stats, peaked
from tiny_models import tiny_model, tiny_tokenizer

from fastedit.arch import arch_for
from fastedit.editing.engine import apply_edit
from fastedit.editing.postnorm import nearest_reachable, post_norm_gain, pre_norm_targets, rms_norm_gain
from fastedit.errors import ConfigError
from fastedit.requests import EditRequest


def rms_normed(m: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    return gain * m / m.pow(2).mean(dim=-1, keepdim=True).sqrt()


@pytest.fixture
def setting():
    gen = torch.Generator().manual_seed(0)
    gain = torch.exp(1.5 * torch.randn(32, generator=gen, dtype=torch.float64))
    gain[3] = 0.0  # Gemma has gains that are exactly ~0
    m = 0.1 * torch.randn(5, 32, generator=gen, dtype=torch.float64)
    wanted = 2.0 * torch.randn(5, 32, generator=gen, dtype=torch.float64)
    return gain, m, wanted


def test_nearest_reachable_is_on_the_surface_and_beats_gradient_descent(setting):
    gain, m, wanted = setting
    n_star = rms_normed(m, gain) + wanted
    u = nearest_reachable(n_star, gain)
    assert torch.allclose(u.pow(2).mean(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-9)
    ours = (gain * u - n_star).norm(dim=1)
    # Gradient descent on the unconstrained m' (N is scale invariant, so any m' is a point of the surface).
    x = m.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.01)
    for _ in range(3000):
        loss = (rms_normed(x, gain) - n_star).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    searched = (rms_normed(x.detach(), gain) - n_star).norm(dim=1)
    assert (ours <= searched + 1e-6).all(), (ours, searched)


def test_pre_norm_targets_reach_what_is_reachable(setting):
    gain, m, wanted = setting
    # No change wanted: no change asked of W.
    zero, reached0 = pre_norm_targets(m, torch.zeros_like(m), gain)
    assert zero.abs().max() < 1e-12 and reached0.abs().max() < 1e-9
    # A change that stays on the surface (another reachable point) is reached exactly.
    other = 0.1 * torch.randn(5, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = rms_normed(other, gain) - rms_normed(m, gain)
    delta, reached = pre_norm_targets(m, r, gain)
    assert torch.allclose(reached, r, atol=1e-6 * float(r.abs().max()))
    assert torch.allclose(rms_normed(m + delta, gain) - rms_normed(m, gain), reached, atol=1e-8)
    # An arbitrary change: the reached part is the closest reachable one, and ΔM is W-sized (|m| ~ 0.6), not
    # residual-sized (|r| ~ 11) as ignoring the norm would ask.
    delta, reached = pre_norm_targets(m, wanted, gain)
    assert (delta.norm(dim=1) < 4 * m.norm(dim=1)).all()
    assert ((reached - wanted).norm(dim=1) < wanted.norm(dim=1)).all()


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gain_probe_reads_one_plus_w(family):
    model = tiny_model(family)
    spec = arch_for(model)
    norm = model.get_submodule(spec.path("post_mlp_norm", 1))
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-1.0, 3.0, norm.weight.numel()))
    assert torch.allclose(post_norm_gain(model, spec, 1), 1.0 + norm.weight.double(), atol=1e-5)


def test_gain_probe_refuses_a_layernorm():
    with pytest.raises(ConfigError, match="RMSNorm"):
        rms_norm_gain(torch.nn.LayerNorm(16), 16)


# ---- the edit itself on tiny Gemma 2 / Gemma 3 models ----------------------------------------------------------


def _gemma_like(family: str) -> torch.nn.Module:
    """A tiny model with unit-variance weights and post-MLP gains spread like Gemma's (log-normal, ≫ 1)."""
    model = peaked(tiny_model(family))
    spec = arch_for(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in range(spec.n_layers(model.config)):
            weight = model.get_submodule(spec.path("post_mlp_norm", layer)).weight
            weight.copy_(4.0 * torch.exp(torch.randn(weight.shape, generator=gen)) - 1.0)  # gain = 1 + w
    return model


def _next_logp(model: torch.nn.Module, tok, text: str) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([tok(text).input_ids])).logits[0, -1].float(), -1)


def _one_token_words(tok, logp: torch.Tensor) -> list[tuple[str, int]]:
    """Vocabulary entries " word" that tokenise back to themselves, most likely first."""
    out = []
    for t in logp.argsort(descending=True).tolist():
        word = tok.decode([t])
        if word.startswith(" ") and word.strip() and tok(word, add_special_tokens=False).input_ids == [t]:
            out.append((word.strip(), t))
    return out


@pytest.mark.parametrize("method", ["memit", "emmet"])
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_edit_reaches_its_target_and_leaves_an_unrelated_prompt(family, method):
    tok = tiny_tokenizer()
    model = _gemma_like(family)
    template, subject = "The Louvre is a museum in {}", "Paris"
    prompt = template.replace("{}", subject)
    before = _next_logp(model, tok, prompt)
    words = _one_token_words(tok, before)
    (true, true_id), (new, new_id) = words[0], words[5]
    assert before[true_id] > before[new_id]
    unrelated_before = _next_logp(model, tok, UNRELATED)
    hp = hp_for(method, mom2_update_weight=10.0, v_num_grad_steps=25)
    assert hp.post_norm == "per_layer"  # the default treatment
    stats = key_stats(model, tok, hp.layers)
    result = apply_edit(
        model, tok, [EditRequest("0", template, subject, new, true)], method=method, hparams=hp, stats=stats
    )
    after = _next_logp(model, tok, prompt)
    # The edit flips the prediction and the edited model scores the target as the v* optimisation did, i.e.
    # the closed form realised the per-layer targets through the norms.
    assert after[new_id] > after[true_id], (after[new_id], after[true_id])
    assert abs(-after[new_id].item() - result.info["requests"][0]["nll_end"]) < 0.25
    spec = arch_for(model)
    assert list(result.info["site"]) == [spec.path("mlp_out", layer) for layer in hp.layers]
    unrelated_after = _next_logp(model, tok, UNRELATED)
    kl = float((unrelated_before.exp() * (unrelated_before - unrelated_after)).sum())
    assert kl < 0.02, kl
