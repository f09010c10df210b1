"""The editable matrix W of ``mlp_out`` in one orientation: (d_model, d_k), keys are columns.

nn.Linear stores weight as (out, in) = (d_model, d_k) already; GPT-2's Conv1D stores (in, out) and is
transposed here, so editors never see the difference.
"""

from __future__ import annotations

import torch

from fastedit.arch.spec import ArchSpec


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
