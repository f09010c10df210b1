"""Run only part of a model again and again: the v* loop's "do less work" machinery.

δ is added at one layer L, at each row's subject token. Two kinds of work never see it:

- layers below L: one recording forward stores the hidden state that enters layer L and every call (args,
  kwargs: masks, rotary tables, the cache...) that layers L..N-1 receive; each optimisation step re-runs only
  layers L..N-1 from that stored input;
- with ``prefix_len`` > 0 (rows aligned so the subject token sits in column ``prefix_len``, see
  `fastedit.editing.batching.anchor_pad`), the positions before it: attention is causal, so their keys and
  values are fixed. They are computed once into a key/value cache and each step runs only the suffix columns
  (the subject token, the rest of the prompt and the target), reading the cached prefix. The cache is reset to
  the prefix after every step, so steps do not see each other's suffixes.

Logits are computed only at the positions the loss reads. Generic across families because the layers' own
recorded inputs are replayed and the cache is transformers' own `DynamicCache` (sliding-window layers included).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from transformers import DynamicCache

from fastedit.arch import ArchSpec, first_tensor
from fastedit.arch.forward import cache_kwargs
from fastedit.arch.hooks import StopForward


class LayerReplay:
    """Record one forward from layer ``start`` on; then ``logits_at(...)`` re-runs that part."""

    def __init__(self, model: torch.nn.Module, spec: ArchSpec, start: int) -> None:
        self.model, self.spec, self.start = model, spec, start
        self.layers = model.get_submodule(spec.layers)
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.hidden_in: torch.Tensor | None = None
        self.text_config = spec.text_config(model.config)
        self.softcap = getattr(self.text_config, "final_logit_softcapping", None)
        self.cache: DynamicCache | None = None
        self._prefix_state: list[dict[str, Any]] = []

    @torch.no_grad()
    def record(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        prefix_len: int = 0,
    ) -> None:
        """Record the layers' calls for ``input_ids`` (n, T); with ``prefix_len`` > 0 only for the columns
        ``prefix_len``..T-1, the columns before it going into the key/value cache once.

        Module hooks (e.g. a capture of the δ site) see the prefix pass first, then the suffix pass.
        """
        extra: dict[str, Any] = {"use_cache": False}
        if position_ids is not None:
            extra["position_ids"] = position_ids
        if prefix_len > 0:
            self.cache = DynamicCache(config=self.text_config)
            head = {"position_ids": position_ids[:, :prefix_len]} if position_ids is not None else {}
            self._run_layers(
                input_ids[:, :prefix_len],
                attention_mask[:, :prefix_len],
                **cache_kwargs(self.model, self.cache),
                **head,
            )
            # update() replaces a layer's tensors rather than writing into them: a shallow copy is a snapshot.
            self._prefix_state = [dict(layer.__dict__) for layer in self.cache.layers]
            input_ids = input_ids[:, prefix_len:]
            extra = cache_kwargs(self.model, self.cache)
            if position_ids is not None:
                extra["position_ids"] = position_ids[:, prefix_len:]
        calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        handles = []
        for idx in range(self.start, len(self.layers)):

            def pre(_m: Any, args: tuple, kwargs: dict, idx: int = idx) -> None:
                calls[idx] = (args, dict(kwargs))

            handles.append(self.layers[idx].register_forward_pre_hook(pre, with_kwargs=True))
        try:
            # The mask always spans the whole row: the suffix attends to the cached prefix.
            self._run_layers(input_ids, attention_mask, **extra)
        finally:
            for h in handles:
                h.remove()
        self._reset_cache()
        self.calls = [calls[i] for i in range(self.start, len(self.layers))]
        args, kwargs = self.calls[0]
        self.hidden_in = (args[0] if args else kwargs["hidden_states"]).detach()

    def select_rows(self, index: torch.Tensor) -> LayerReplay:
        """A replay of the recorded rows ``index`` (1-D, ascending) alone, without running anything again.

        Every recorded per-row tensor (dim 0 of size n and at least 2-D: the hidden state, masks, rotary tables,
        position ids) and the cached prefix's keys/values (n, heads, P, d_head) are sliced; what is shared by all
        rows (cache positions, 0-d tensors, scalars) is kept. The rows keep their padded width."""
        assert self.hidden_in is not None, "call record() first"
        n = self.hidden_in.shape[0]
        new = copy.copy(self)
        if self.cache is not None:
            new.cache = copy.copy(self.cache)
            new.cache.layers = [copy.copy(layer) for layer in self.cache.layers]
            new._prefix_state = [_rows_of(state, index, n, {}) for state in self._prefix_state]
            new._reset_cache()
        swap = {} if self.cache is None else {id(self.cache): new.cache}
        new.calls = [_rows_of(call, index, n, swap) for call in self.calls]
        new.hidden_in = self.hidden_in.index_select(0, index)
        return new

    def _run_layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> None:
        """One forward through every layer, stopped before the final norm and head (no logits needed)."""

        def stop(*_: Any) -> None:
            raise StopForward

        handle = self.layers[len(self.layers) - 1].register_forward_hook(stop)
        try:
            with contextlib.suppress(StopForward):
                use_cache = kwargs.pop("use_cache", True)
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        finally:
            handle.remove()

    def _reset_cache(self) -> None:
        """Back to the prefix's keys/values (and lengths) after a pass appended a suffix."""
        if self.cache is not None:
            for layer, state in zip(self.cache.layers, self._prefix_state, strict=True):
                layer.__dict__.update(state)

    def _call(self, layer: torch.nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
        args, kwargs = call
        if args:
            return first_tensor(layer(hidden, *args[1:], **kwargs))
        return first_tensor(layer(**{**kwargs, "hidden_states": hidden}))

    def logits_at(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (m, vocab) at (rows[j], positions[j]), running layers start..N-1 from the recorded input.

        ``positions`` index the recorded columns: with a prefix, column 0 is the row's column ``prefix_len``.
        Hooks registered on the model (e.g. the δ insertion) fire as usual inside the layers.
        """
        assert self.hidden_in is not None, "call record() first"
        hidden = self.hidden_in
        try:
            for offset, call in enumerate(self.calls):
                hidden = self._call(self.layers[self.start + offset], hidden, call)
        finally:
            self._reset_cache()  # the autograd graph keeps what this pass appended; the cache must not
        picked = hidden[rows, positions]  # (m, d_model): the final norm and head act per position
        return head_logits(self.model, self.spec, picked, self.softcap)


def _rows_of(value: Any, index: torch.Tensor, n: int, swap: dict[int, Any]) -> Any:
    """``value`` with every tensor of n rows (dim 0 of size n, at least 2-D) reduced to rows ``index``, through
    tuples, lists and dicts; objects whose id is in ``swap`` are replaced (the cache by its sliced copy)."""
    if id(value) in swap:
        return swap[id(value)]
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index) if value.ndim >= 2 and value.shape[0] == n else value
    if isinstance(value, tuple | list):
        items = [_rows_of(v, index, n, swap) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # named tuples too
    if isinstance(value, dict):
        return {k: _rows_of(v, index, n, swap) for k, v in value.items()}
    return value


def head_logits(model: torch.nn.Module, spec: ArchSpec, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Final norm + LM head (+ Gemma 2's logit soft-capping when the config sets it) on (..., d_model)."""
    logits = model.get_submodule(spec.lm_head)(model.get_submodule(spec.final_norm)(hidden))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
