"""Hooks capture the real tensors, modify exactly what they should, stop early, and always detach."""

from __future__ import annotations

import pytest
import torch
from tiny_models import D_K, D_MODEL, tiny_model

from fastedit.arch import (
    StopForward,
    add_at_positions,
    arch_for,
    capture,
    edit_input,
    mlp_out_matrix,
    stop_after,
)


def _batch(tokenizer, texts=("The Eiffel Tower is located in", "Michael Jordan plays")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def test_captured_keys_are_the_real_input_of_mlp_out(family_model, tokenizer):
    _, model = family_model
    spec = arch_for(model)
    name = spec.path("mlp_out", 1)
    batch = _batch(tokenizer)
    with capture(model, [name], inputs=True, outputs=True) as rec:
        logits = model(**batch).logits
    keys, out = rec[name].input, rec[name].output
    assert keys.shape == (*batch["input_ids"].shape, D_K)
    # The module's output is W k (+ b): recompute it from the captured key with the oriented matrix.
    module = spec.module(model, "mlp_out", 1)
    bias = getattr(module, "bias", None)
    expected = keys @ mlp_out_matrix(model, spec, 1).T + (bias if bias is not None else 0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert logits.shape[-1] == model.config.get_text_config().vocab_size


def test_keys_independent_of_hook_mechanism(tokenizer):
    """The captured key equals the activation recomputed by hand from the MLP input (llama: act(g) * u)."""
    model = tiny_model("llama")
    spec = arch_for(model)
    gate, up = spec.paths("mlp_in", 2)
    with capture(model, [gate, up, spec.path("mlp_out", 2)], inputs=True) as rec:
        model(**_batch(tokenizer))
    act = model.get_submodule(spec.path("mlp", 2)).act_fn
    manual = act(rec[gate].output) * rec[up].output
    torch.testing.assert_close(rec[spec.path("mlp_out", 2)].input, manual)


def test_capture_several_modules_in_one_forward(tokenizer):
    model = tiny_model("gemma3_text")
    spec = arch_for(model)
    names = [spec.path("mlp_out", i) for i in range(3)] + [spec.path("block", 0)]
    with capture(model, names, inputs=True) as rec:
        model(**_batch(tokenizer))
    assert all(rec[n].input is not None for n in names)
    assert rec[spec.path("block", 0)].output.shape[-1] == D_MODEL


def test_add_at_positions_changes_exactly_the_downstream_outputs(family_model, tokenizer):
    _, model = family_model
    spec = arch_for(model)
    batch = _batch(tokenizer)
    blocks = [spec.path("block", i) for i in range(3)]
    with capture(model, blocks) as clean:
        model(**batch)
    positions = torch.tensor([2, 1])
    delta = torch.randn(D_MODEL) * 5
    with add_at_positions(model, spec.path("block", 1), delta, positions), capture(model, blocks) as dirty:
        model(**batch)
    # Layer 0 (upstream) is untouched.
    torch.testing.assert_close(dirty[blocks[0]].output, clean[blocks[0]].output)
    # At layer 1 exactly the chosen positions moved, by delta.
    diff = dirty[blocks[1]].output - clean[blocks[1]].output
    for row, pos in enumerate(positions.tolist()):
        torch.testing.assert_close(diff[row, pos], delta, rtol=1e-4, atol=1e-4)
        others = torch.ones(diff.shape[1], dtype=torch.bool)
        others[pos] = False
        assert diff[row, others].abs().max() == 0
    # Downstream (layer 2): causal attention moves the chosen position and later ones, never earlier ones.
    diff2 = (dirty[blocks[2]].output - clean[blocks[2]].output).abs().amax(-1)
    for row, pos in enumerate(positions.tolist()):
        assert diff2[row, :pos].max() == 0
        assert diff2[row, pos] > 0


def test_add_at_positions_passes_gradients_to_delta(tokenizer):
    model = tiny_model("gpt2")
    spec = arch_for(model)
    delta = torch.zeros(D_MODEL, requires_grad=True)
    with add_at_positions(model, spec.path("mlp", 0), delta, [3, 3]):
        loss = model(**_batch(tokenizer)).logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_stop_after_ends_the_forward(tokenizer):
    model = tiny_model("llama")
    spec = arch_for(model)
    later = spec.path("block", 2)
    with capture(model, [spec.path("mlp_out", 1), later], inputs=True, stop_after=spec.path("block", 1)) as rec:
        result = model(**_batch(tokenizer))
        pytest.fail(f"the forward returned {type(result)} instead of stopping")
    assert rec[spec.path("mlp_out", 1)].input is not None
    assert rec[later].output is None  # layer 2 never ran
    with stop_after(model, spec.path("mlp_out", 0)):
        model(**_batch(tokenizer))
    # Hooks are gone: a normal forward runs to the logits.
    assert model(**_batch(tokenizer)).logits is not None


def test_hooks_detach_after_errors(tokenizer):
    model = tiny_model("gemma2")
    spec = arch_for(model)
    name = spec.path("mlp_out", 0)

    def bad(_x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), edit_input(model, name, bad):
        model(**_batch(tokenizer))
    with pytest.raises(RuntimeError, match="boom"), capture(model, [name], inputs=True):
        raise RuntimeError("boom")
    assert not model.get_submodule(name)._forward_pre_hooks
    assert not model.get_submodule(name)._forward_hooks
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hidden_states_as_keyword_arguments():
    """A module called with hidden_states=... (keyword) is captured and edited like a positional call."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, *, hidden_states):
            return (self.proj(hidden_states), "extra")

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(hidden_states=x)

    model = Outer()
    x = torch.randn(2, 3, 4)
    with capture(model, ["block"], inputs=True) as rec:
        out, extra = model(x)
    torch.testing.assert_close(rec["block"].input, x)
    torch.testing.assert_close(rec["block"].output, out)
    assert extra == "extra"
    with edit_input(model, "block", lambda h: h * 0):
        zeroed, _ = model(x)
    torch.testing.assert_close(zeroed, model.block.proj.bias.expand_as(zeroed))
    with add_at_positions(model, "block", torch.ones(4), [0, 2]):
        moved, extra = model(x)
    assert extra == "extra"
    torch.testing.assert_close(moved[0, 0] - out[0, 0], torch.ones(4))
    assert StopForward.__mro__[1] is Exception
