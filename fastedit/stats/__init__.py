"""Key second moments C0 = (1/N) Σ k kᵀ with minimal precomputation: corpora, one-pass accumulation, cache files."""

from fastedit.stats.errors import CorpusError, StatsCacheError, StatsError
from fastedit.stats.keystats import DEFAULT_REL_EPS, KeyStats, condition_number
from fastedit.stats.layers import default_layers
from fastedit.stats.precompute import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_DM,
    DEFAULT_SEQ_LEN,
    ensure_stats,
    load_covariance,
    load_stats,
    run_stats,
)

__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "DEFAULT_DM",
    "DEFAULT_REL_EPS",
    "DEFAULT_SEQ_LEN",
    "CorpusError",
    "KeyStats",
    "StatsCacheError",
    "StatsError",
    "condition_number",
    "default_layers",
    "ensure_stats",
    "load_covariance",
    "load_stats",
    "run_stats",
]
