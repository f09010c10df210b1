"""Documents -> fixed-length token rows -> padded batches: exactly the token positions whose keys count.

Documents are tokenized in order and packed back to back into rows of ``seq_len`` tokens, each row starting with
the tokenizer's special prefix (e.g. <bos>), so no position is wasted on padding; the last row is cut so the total
is exactly ``n_tokens``. Only the final batch can hold a shorter row; its padding is masked and never counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fastedit.stats.corpus import special_prefix
from fastedit.stats.errors import StatsError

DOC_SEPARATOR = "\n\n"


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long; 0 = padding (right side only)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def plan_rows(tokenizer: Any, documents: Iterable[str], n_tokens: int | None, seq_len: int) -> list[torch.Tensor]:
    """Rows (1-D long tensors) holding exactly ``n_tokens`` positions, or every token when ``n_tokens`` is None.

    Returns fewer positions only when the documents run out (the caller reports that).
    """
    prefix = special_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise StatsError(f"--seq-len {seq_len} leaves no room for text after {len(prefix)} special token(s)")
    rows: list[torch.Tensor] = []
    total = 0
    pending: list[int] = []

    def emit(chunk: list[int]) -> bool:
        nonlocal total
        row = prefix + chunk
        if n_tokens is not None:
            row = row[: n_tokens - total]
        rows.append(torch.tensor(row, dtype=torch.long))
        total += len(row)
        return n_tokens is not None and total >= n_tokens

    for doc in documents:
        pending.extend(tokenizer(doc + DOC_SEPARATOR, add_special_tokens=False).input_ids)
        start = 0
        while len(pending) - start >= body:
            if emit(pending[start : start + body]):
                return rows
            start += body
        pending = pending[start:]
    if pending and not (n_tokens is not None and total >= n_tokens):
        emit(pending)
    return rows


def make_batches(rows: list[torch.Tensor], batch_tokens: int, seq_len: int, pad_id: int) -> list[Batch]:
    """Consecutive rows, ``batch_tokens // seq_len`` per batch (at least one), right-padded with a mask."""
    per_batch = max(1, batch_tokens // seq_len)
    batches = []
    for i in range(0, len(rows), per_batch):
        group = rows[i : i + per_batch]
        width = max(len(r) for r in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for j, row in enumerate(group):
            ids[j, : len(row)] = row
            mask[j, : len(row)] = 1
        batches.append(Batch(ids, mask))
    return batches
