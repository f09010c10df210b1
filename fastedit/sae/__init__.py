"""Sparse autoencoders on the registry's hooks, the seed-paper variants, and the unlearning comparison."""

from fastedit.sae.api import eval_sae, train_sae
from fastedit.sae.io import SAEFormatError, SAEInfo, load_sae, save_sae
from fastedit.sae.model import ARCHS, SAE, SAEConfig
from fastedit.sae.unlearn import UnlearnConfig, run_unlearning

__all__ = [
    "ARCHS",
    "SAE",
    "SAEConfig",
    "SAEFormatError",
    "SAEInfo",
    "UnlearnConfig",
    "eval_sae",
    "load_sae",
    "run_unlearning",
    "save_sae",
    "train_sae",
]
