"""Run only the upper part of a model again and again: the v* loop's "do less work" machinery.

δ is added at one layer L; layers below L never see it. One recording forward stores the hidden state that
enters layer L and every call (args, kwargs: masks, rotary tables...) that layers L..N-1 receive; each
optimisation step then re-runs only layers L..N-1 from that stored input and computes logits only at the
positions the loss reads. Generic across families because the layers' own recorded inputs are replayed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from fastedit.arch import ArchSpec, first_tensor
from fastedit.arch.hooks import StopForward


class LayerReplay:
    """Record one forward of ``input_ids`` from layer ``start`` on; then ``logits_at(...)`` re-runs that part."""

    def __init__(self, model: torch.nn.Module, spec: ArchSpec, start: int) -> None:
        self.model, self.spec, self.start = model, spec, start
        self.layers = model.get_submodule(spec.layers)
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.hidden_in: torch.Tensor | None = None
        cfg = spec.text_config(model.config)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)

    @torch.no_grad()
    def record(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        handles = []
        n = len(self.layers)
        for idx in range(self.start, n):

            def pre(_m: Any, args: tuple, kwargs: dict, idx: int = idx) -> None:
                calls[idx] = (args, dict(kwargs))

            handles.append(self.layers[idx].register_forward_pre_hook(pre, with_kwargs=True))

        def stop(*_: Any) -> None:
            raise StopForward

        handles.append(self.layers[n - 1].register_forward_hook(stop))
        try:
            with contextlib.suppress(StopForward):
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self.calls = [calls[i] for i in range(self.start, n)]
        args, kwargs = self.calls[0]
        self.hidden_in = (args[0] if args else kwargs["hidden_states"]).detach()

    def _call(self, layer: torch.nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
        args, kwargs = call
        if args:
            return first_tensor(layer(hidden, *args[1:], **kwargs))
        return first_tensor(layer(**{**kwargs, "hidden_states": hidden}))

    def logits_at(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (m, vocab) at (rows[j], positions[j]), running layers start..N-1 from the recorded input.

        Hooks registered on the model (e.g. the δ insertion) fire as usual inside the layers.
        """
        assert self.hidden_in is not None, "call record() first"
        hidden = self.hidden_in
        for offset, call in enumerate(self.calls):
            hidden = self._call(self.layers[self.start + offset], hidden, call)
        picked = hidden[rows, positions]  # (m, d_model): the final norm and head act per position
        return head_logits(self.model, self.spec, picked, self.softcap)


def head_logits(model: torch.nn.Module, spec: ArchSpec, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Final norm + LM head (+ Gemma 2's logit soft-capping when the config sets it) on (..., d_model)."""
    logits = model.get_submodule(spec.lm_head)(model.get_submodule(spec.final_norm)(hidden))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
