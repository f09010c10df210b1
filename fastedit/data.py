"""Where fastedit finds its default data offline: the WikiText-2 raw test file.

``$FASTEDIT_WIKITEXT`` wins; otherwise ``../shared/data/wikitext-2-raw/wiki.test.raw`` next to the repository
(the layout of this project's machines). Used as generic text by the SAE trainer, the unlearning retain corpus
and, when the Hugging Face hub is unreachable, the covariance precompute.
"""

from __future__ import annotations

import os
from pathlib import Path

WIKITEXT_ENV = "FASTEDIT_WIKITEXT"


def default_wikitext() -> Path:
    """The WikiText-2 raw test file: $FASTEDIT_WIKITEXT, else ../shared/data next to the repository."""
    if os.environ.get(WIKITEXT_ENV):
        return Path(os.environ[WIKITEXT_ENV])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
