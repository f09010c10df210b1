"""fastedit: edit facts in language models with minimal covariance precomputation."""

from fastedit.arch import ArchSpec, arch_for, capture, get_arch, register_arch
from fastedit.errors import FasteditError
from fastedit.models import load_model

__version__ = "0.1.0"

__all__ = [
    "ArchSpec",
    "FasteditError",
    "__version__",
    "arch_for",
    "capture",
    "get_arch",
    "load_model",
    "register_arch",
]
