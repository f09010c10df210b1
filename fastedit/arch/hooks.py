"""Hooks as context managers: capture inputs/outputs of named modules, modify outputs, stop a forward early.

Every context manager removes its hooks on exit, also when the forward raised. Hidden states may reach a
module positionally or as a keyword (``hidden_states=``, ``input=``, ``x=``); outputs may be a tensor or a
tuple whose first element is the hidden state. The usual pattern::

    with capture(model, ["model.layers.3.mlp.down_proj"], inputs=True, stop_after="model.layers.3") as rec:
        model(**batch)          # stops after layer 3 instead of running the rest of the model
    keys = rec["model.layers.3.mlp.down_proj"].input   # (batch, seq, d_k)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_HIDDEN_KWARGS = ("hidden_states", "input", "x", "hidden_state", "inputs_embeds")


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; `capture` swallows it."""


@dataclass
class Captured:
    """What a module saw in the last forward: its (first) input and its (first) output."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in _HIDDEN_KWARGS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("hooked module received no tensor input")


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden state inside a module output (a tensor, or a tuple/list whose first element is one)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find a hidden-state tensor in module output of type {type(output).__name__}")


def _replace_first(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise TypeError(f"cannot replace the hidden state in module output of type {type(output).__name__}")


def _replace_first_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], new: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args and isinstance(args[0], torch.Tensor):
        return (new, *args[1:]), kwargs
    for key in _HIDDEN_KWARGS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return args, {**kwargs, key: new}
    raise TypeError("hooked module received no tensor input to replace")


def _prepare(tensor: torch.Tensor, detach: bool, clone: bool) -> torch.Tensor:
    if detach:
        tensor = tensor.detach()
    return tensor.clone() if clone else tensor


@contextlib.contextmanager
def _hooks_removed_on_exit() -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture(
    model: torch.nn.Module,
    names: Iterable[str],
    *,
    inputs: bool = False,
    outputs: bool = True,
    detach: bool = True,
    clone: bool = False,
    stop_after: str | None = None,
) -> Iterator[dict[str, Captured]]:
    """Record the input and/or output of each named module during the forwards run inside the block.

    ``stop_after`` names a module after whose forward the pass ends (`StopForward`, swallowed on exit), so
    no later layer and no logits are computed. Put the model call last inside the ``with`` block.
    ``detach=False`` keeps the autograd graph (for optimising through captured tensors).
    """
    names = list(dict.fromkeys(names))
    records = {name: Captured() for name in names}
    with _hooks_removed_on_exit() as handles:
        for name in names:
            module = model.get_submodule(name)
            record = records[name]
            if inputs:

                def pre_hook(_m: Any, args: tuple, kwargs: dict, record: Captured = record) -> None:
                    record.input = _prepare(_first_input(args, kwargs), detach, clone)

                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            if outputs:

                def post_hook(_m: Any, _a: Any, output: Any, record: Captured = record) -> None:
                    record.output = _prepare(first_tensor(output), detach, clone)

                handles.append(module.register_forward_hook(post_hook))
        if stop_after is not None:

            def stop_hook(*_: Any) -> None:
                raise StopForward(stop_after)

            # Registered last, so the capture hooks of the same module run first.
            handles.append(model.get_submodule(stop_after).register_forward_hook(stop_hook))
        with contextlib.suppress(StopForward):
            yield records


@contextlib.contextmanager
def stop_after(model: torch.nn.Module, name: str) -> Iterator[None]:
    """End every forward inside the block right after module ``name`` has run."""
    with capture(model, [], stop_after=name):
        yield


@contextlib.contextmanager
def edit_output(model: torch.nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the hidden-state output ``h`` of module ``name`` by ``fn(h)`` during the block."""
    with _hooks_removed_on_exit() as handles:

        def hook(_m: Any, _a: Any, output: Any) -> Any:
            return _replace_first(output, fn(first_tensor(output)))

        handles.append(model.get_submodule(name).register_forward_hook(hook))
        yield


@contextlib.contextmanager
def edit_input(model: torch.nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the hidden-state input ``x`` of module ``name`` by ``fn(x)`` (positional or keyword)."""
    with _hooks_removed_on_exit() as handles:

        def hook(_m: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return _replace_first_input(args, kwargs, fn(_first_input(args, kwargs)))

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        yield


def add_at_positions(
    model: torch.nn.Module,
    name: str,
    delta: torch.Tensor,
    positions: Sequence[int] | torch.Tensor,
) -> contextlib.AbstractContextManager[None]:
    """Add ``delta`` to the output of ``name`` at one position per batch row.

    delta: (d,) added to every row, or (batch, d) one vector per row; positions: (batch,) token indices.
    Gradients flow into ``delta`` (used by the v* optimisation). Other positions are untouched.
    """
    pos = torch.as_tensor(positions, dtype=torch.long)

    def add(hidden: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if pos.shape[0] != hidden.shape[0]:
            raise ValueError(f"{pos.shape[0]} positions for a batch of {hidden.shape[0]} rows")
        vec = delta.to(hidden.dtype)
        vec = vec.expand(hidden.shape[0], -1) if vec.dim() == 1 else vec
        out = hidden.clone()
        out[rows, pos.to(hidden.device)] = out[rows, pos.to(hidden.device)] + vec
        return out

    return edit_output(model, name, add)
