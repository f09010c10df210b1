"""fastedit: edit facts in language models with minimal covariance precomputation."""

from fastedit.arch import ArchSpec, arch_for, capture, get_arch, register_arch
from fastedit.editing.api import EditOutcome, edit, evaluate
from fastedit.editing.patch import Patch, apply_patch, revert_patch
from fastedit.errors import FasteditError
from fastedit.models import load_model
from fastedit.requests import EditRequest, load_requests

__version__ = "0.1.0"

__all__ = [
    "ArchSpec",
    "EditOutcome",
    "EditRequest",
    "FasteditError",
    "Patch",
    "__version__",
    "apply_patch",
    "arch_for",
    "capture",
    "edit",
    "evaluate",
    "get_arch",
    "load_model",
    "load_requests",
    "register_arch",
    "revert_patch",
]
