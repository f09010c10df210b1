"""Token batches for editing: right-padded id lists, or rows aligned at an anchor token (left and right padded)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def pad_token_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def inverse_order(order: Sequence[int]) -> torch.Tensor:
    """``where`` with ``where[order[j]] = j``: the row at which item i sits after items were run in ``order``."""
    where = torch.empty(len(order), dtype=torch.long)
    where[torch.as_tensor(list(order), dtype=torch.long)] = torch.arange(len(order))
    return where


def right_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (n, max_len); padding goes after each row's tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


@dataclass(frozen=True)
class AnchoredBatch:
    """Rows padded so every row's anchor token sits in column ``prefix_len``.

    ids, mask, position_ids: (n, prefix_len + suffix_len). Columns < prefix_len hold each row's tokens before
    its anchor (left-padded); column ``prefix_len`` holds the anchors. position_ids count real tokens only, so a
    row's positions (and its logits) are those of the unpadded row.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    prefix_len: int


def anchor_pad(
    rows: Sequence[Sequence[int]], anchors: Sequence[int], pad_id: int, device: torch.device | str = "cpu"
) -> AnchoredBatch:
    """Align ``rows`` at token index ``anchors[i]`` of row i (0 <= anchors[i] < len(row))."""
    for i, (row, anchor) in enumerate(zip(rows, anchors, strict=True)):
        if not 0 <= anchor < len(row):
            raise ValueError(f"row {i}: anchor {anchor} is outside its {len(row)} tokens")
    prefix = max(anchors)
    width = prefix + max(len(row) - anchor for row, anchor in zip(rows, anchors, strict=True))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, anchor) in enumerate(zip(rows, anchors, strict=True)):
        start = prefix - anchor
        ids[i, start : start + len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, start : start + len(row)] = 1
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    return AnchoredBatch(ids.to(device), mask.to(device), position_ids.to(device), prefix)
