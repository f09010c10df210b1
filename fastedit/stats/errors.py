"""Errors of the statistics precomputation (each names the bad input and says what to do)."""

from __future__ import annotations

from fastedit.errors import FasteditError


class StatsError(FasteditError):
    """Bad precomputation input: d_m, layers, an unwritable output folder, non-finite activations..."""


class CorpusError(StatsError):
    """A corpus that is missing, empty, too short, of an unknown format, or unreachable."""


class StatsCacheError(StatsError):
    """A statistics cache file made for another model / width / run, or unreadable."""
