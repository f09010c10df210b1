"""The layer-hook registry (`ArchSpec` per model_type) and the hook context managers."""

from fastedit.arch.hooks import (
    Captured,
    StopForward,
    add_at_positions,
    capture,
    edit_input,
    edit_output,
    first_tensor,
    stop_after,
)
from fastedit.arch.registry import arch_for, get_arch, known_model_types, register_arch
from fastedit.arch.spec import ArchSpec
from fastedit.arch.weights import (
    add_to_mlp_out,
    mlp_out_matrix,
    mlp_out_param,
    model_device,
    restore_mlp_out,
    restored_after,
    restored_on_error,
    snapshot_mlp_out,
)

__all__ = [
    "ArchSpec",
    "Captured",
    "StopForward",
    "add_at_positions",
    "add_to_mlp_out",
    "arch_for",
    "capture",
    "edit_input",
    "edit_output",
    "first_tensor",
    "get_arch",
    "known_model_types",
    "mlp_out_matrix",
    "mlp_out_param",
    "model_device",
    "register_arch",
    "restore_mlp_out",
    "restored_after",
    "restored_on_error",
    "snapshot_mlp_out",
    "stop_after",
]
