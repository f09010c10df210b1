"""The two real packaged models load through `load_model`, resolve in the registry and know a fact."""

from __future__ import annotations

import pytest
import torch

from fastedit.arch import arch_for, capture, mlp_out_matrix
from fastedit.arch.describe import model_layout

pytestmark = pytest.mark.real


@pytest.mark.parametrize(
    ("fixture", "model_type", "n_layers", "d_model", "d_k", "post_norm"),
    [("smollm2", "llama", 30, 576, 1536, False), ("gemma3", "gemma3_text", 18, 640, 2048, True)],
)
def test_real_model_layout(request, fixture, model_type, n_layers, d_model, d_k, post_norm):
    model, tokenizer = request.getfixturevalue(fixture)
    spec = arch_for(model)
    layout = model_layout(model.config)
    assert (layout["model_type"], layout["n_layers"], layout["d_model"], layout["d_k"]) == (
        model_type,
        n_layers,
        d_model,
        d_k,
    )
    assert layout["post_mlp_norm"] is post_norm
    assert spec.path("mlp_out", 4) == "model.layers.4.mlp.down_proj"
    assert tuple(mlp_out_matrix(model, spec, 4).shape) == (d_model, d_k)
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with capture(model, [spec.path("mlp_out", 4)], inputs=True, stop_after=spec.path("block", 4)) as rec:
        model(**batch)
    assert rec[spec.path("mlp_out", 4)].input.shape[-1] == d_k


def test_gemma_knows_the_eiffel_tower(gemma3):
    model, tokenizer = gemma3
    batch = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    assert batch["input_ids"][0, 0] == tokenizer.bos_token_id  # Gemma prepends <bos>
    with torch.no_grad():
        logits = model(**batch).logits[0, -1]
    assert tokenizer.decode(logits.argmax()) == " Paris"
