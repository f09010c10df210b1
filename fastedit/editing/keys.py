"""Keys at the edited layers: the input of ``mlp_out`` at the subject's last token.

k = ½·k(bare prompt) + ½·mean over the generated prefixes k("<prefix>. prompt"), as MEMIT/ROME compute it.
The same forward also reads the current value at a site (the residual or the mlp_out output of the last
edited layer, at the bare prompt), which is what MEMIT's residual R = Z − H is measured against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastedit.arch import ArchSpec, capture, model_device
from fastedit.editing.batching import inverse_order, pad_token_id, right_pad
from fastedit.editing.subject import subject_last_index
from fastedit.requests import EditRequest
from fastedit.stats.distributed import gather_shares, rank_and_world

CHUNK = 64  # prompts per forward


def contextual_prompts(request: EditRequest, contexts: Sequence[str]) -> list[str]:
    """The request's prompt template inside each context template (``{}`` stays for the subject)."""
    return [context.replace("{}", request.prompt, 1) for context in contexts]


@torch.no_grad()
def read_at_subject(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: ArchSpec,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    *,
    stop_layer: int,
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Inputs/outputs of named modules at the subject's last token: name -> (n_requests, n_contexts, width).

    Runs the contextual prompts in chunks and stops each forward after block ``stop_layer`` (the deepest
    module read must sit in or below it). Every read is at the subject's last token, which in a causal model
    sees no later token: each prompt is cut after it, and prompts of similar length share a chunk (less padding).
    """
    texts = []
    for req in requests:
        for template in contextual_prompts(req, contexts):
            ids = tokenizer(template.replace("{}", req.subject, 1)).input_ids
            texts.append(ids[: subject_last_index(tokenizer, template, req.subject, req.case_id) + 1])
    names = list(dict.fromkeys([*inputs_of, *outputs_of]))
    deepest = spec.path("block", stop_layer)
    out: dict[str, list[torch.Tensor]] = {f"in:{n}": [] for n in inputs_of} | {f"out:{n}": [] for n in outputs_of}
    device, pad = model_device(model), pad_token_id(tokenizer)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(texts), CHUNK):
        chunk = [texts[i] for i in order[start : start + CHUNK]]
        ids, mask = right_pad(chunk, pad, device)
        pos = torch.as_tensor([len(t) - 1 for t in chunk], device=device)
        rows = torch.arange(len(pos), device=device)
        with capture(model, names, inputs=bool(inputs_of), stop_after=deepest) as rec:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for n in inputs_of:
            out[f"in:{n}"].append(rec[n].input[rows, pos].float())
        for n in outputs_of:
            out[f"out:{n}"].append(rec[n].output[rows, pos].float())
    where = inverse_order(order).to(device)  # prompt i's reads are row where[i]
    shape = (len(requests), len(contexts))
    return {key: torch.cat(parts)[where].view(*shape, -1) for key, parts in out.items()}


def average_contexts(per_context: torch.Tensor) -> torch.Tensor:
    """(B, n_contexts, d) -> (B, d): ½ bare (context 0) + ½ mean of the prefixed contexts."""
    if per_context.shape[1] == 1:
        return per_context[:, 0]
    return 0.5 * per_context[:, 0] + 0.5 * per_context[:, 1:].mean(dim=1)


def compute_keys(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: ArchSpec,
    requests: Sequence[EditRequest],
    layer: int,
    contexts: Sequence[str],
    *,
    site: str | None = None,
    site_layer: int | None = None,
    across_ranks: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(K (B, d_k) averaged keys, k_bare (B, d_k), current site output at the bare prompt (B, d) or None).

    ``across_ranks``: inside a process group each rank reads its contiguous share of the requests and every rank
    receives all of them in request order (every rank must call it); with one rank it changes nothing.
    """
    world = rank_and_world()[1] if across_ranks else 1
    if world > 1:

        def share(lo: int, hi: int) -> tuple[torch.Tensor | None, ...]:
            part = compute_keys(
                model, tokenizer, spec, requests[lo:hi], layer, contexts, site=site, site_layer=site_layer
            )
            return tuple(None if t is None else t.cpu() for t in part)

        parts, device = gather_shares(len(requests), share), model_device(model)
        keys, bare, current = (
            None if parts[0][j] is None else torch.cat([p[j] for p in parts]).to(device) for j in range(3)
        )
        return keys, bare, current
    key_name = spec.path("mlp_out", layer)
    read = read_at_subject(
        model,
        tokenizer,
        spec,
        requests,
        contexts,
        stop_layer=max(layer, site_layer if site_layer is not None else layer),
        inputs_of=[key_name],
        outputs_of=[site] if site else [],
    )
    per_context = read[f"in:{key_name}"]
    current = read[f"out:{site}"][:, 0] if site else None
    return average_contexts(per_context), per_context[:, 0], current
