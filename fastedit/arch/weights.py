"""The editable matrix W of ``mlp_out`` in one orientation: (d_model, d_k), keys are columns.

nn.Linear stores weight as (out, in) = (d_model, d_k) already; GPT-2's Conv1D stores (in, out) and is
transposed here, so editors never see the difference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch

from fastedit.arch.spec import ArchSpec


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live: inputs built on the CPU (token ids, masks) are moved here."""
    return next(model.parameters()).device


def mlp_out_param(model: torch.nn.Module, spec: ArchSpec, layer: int) -> torch.nn.Parameter:
    return spec.module(model, "mlp_out", layer).weight


def mlp_out_matrix(model: torch.nn.Module, spec: ArchSpec, layer: int) -> torch.Tensor:
    """W (d_model, d_k) as a view of the parameter (no copy)."""
    weight = mlp_out_param(model, spec, layer)
    return weight.T if spec.conv1d_weights else weight


@torch.no_grad()
def add_to_mlp_out(model: torch.nn.Module, spec: ArchSpec, layer: int, delta: torch.Tensor) -> None:
    """W += delta in place; delta is (d_model, d_k) in any float dtype (cast to the weight's)."""
    matrix = mlp_out_matrix(model, spec, layer)
    if tuple(delta.shape) != tuple(matrix.shape):
        raise ValueError(f"delta of shape {tuple(delta.shape)} for W of shape {tuple(matrix.shape)}")
    matrix.add_(delta.to(device=matrix.device, dtype=matrix.dtype))


@torch.no_grad()
def snapshot_mlp_out(model: torch.nn.Module, spec: ArchSpec, layers: Iterable[int]) -> dict[int, torch.Tensor]:
    """Exact copies of the ``mlp_out`` parameters of ``layers`` (to restore after a failed or undone edit)."""
    return {layer: mlp_out_param(model, spec, layer).detach().clone() for layer in layers}


@torch.no_grad()
def restore_mlp_out(model: torch.nn.Module, spec: ArchSpec, snapshot: Mapping[int, torch.Tensor]) -> None:
    """Copy a snapshot back, bit-exactly (on the parameter's own device and dtype)."""
    for layer, original in snapshot.items():
        param = mlp_out_param(model, spec, layer)
        param.copy_(original.to(device=param.device, dtype=param.dtype))


@contextlib.contextmanager
def restored_on_error(model: torch.nn.Module, spec: ArchSpec, layers: Iterable[int]) -> Iterator[None]:
    """Inside the block the ``mlp_out`` weights of ``layers`` may change; any exception (Ctrl-C included)
    puts them back bit-exactly before it propagates."""
    snapshot = snapshot_mlp_out(model, spec, layers)
    try:
        yield
    except BaseException:
        restore_mlp_out(model, spec, snapshot)
        raise


@contextlib.contextmanager
def restored_after(model: torch.nn.Module, spec: ArchSpec, layers: Iterable[int]) -> Iterator[None]:
    """The ``mlp_out`` weights of ``layers`` are put back bit-exactly when the block ends, however it ends."""
    snapshot = snapshot_mlp_out(model, spec, layers)
    try:
        yield
    finally:
        restore_mlp_out(model, spec, snapshot)
