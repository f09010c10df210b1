"""Teacher-forced scoring of targets after prompts: mean per-token NLL and token accuracy, batched.

A pair (prompt, target) is scored on the tokens of ``" " + target`` following the prompt. The prompt is
tokenised the model's way (BOS included when the tokenizer adds one); the target's tokens are the tail of the
joint tokenisation of ``prompt + " " + target`` (so BPE merges across the boundary cannot misalign them).
Rows are right-padded (positions stay natural for absolute-position models such as GPT-2), sorted by length,
and logits are computed only over the span of positions that predict target tokens (`logits_to_keep`):
with a 262k-token vocabulary (Gemma) full logits would dominate time and memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastedit.arch import model_device
from fastedit.progress import track


@dataclass(frozen=True)
class TargetScore:
    """nll: mean over the target's tokens of -log p(token | prefix); accuracy: share of tokens that are argmax."""

    nll: float
    accuracy: float
    n_tokens: int

    @property
    def prob(self) -> float:
        """exp(-mean NLL): the per-token geometric-mean probability (what the magnitudes EM/PM/NM compare)."""
        return float(torch.tensor(-self.nll).exp())


def encode_pair(tokenizer: Any, prompt: str, target: str) -> tuple[list[int], int]:
    """Token ids of prompt + " " + target, and the number of prompt tokens (the target is the rest)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + " " + target)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    # Tokenizers that append EOS would put it after the target: drop it (it is not part of the target).
    if eos is not None and prompt_ids and prompt_ids[-1] == eos and full and full[-1] == eos:
        prompt_ids, full = prompt_ids[:-1], full[:-1]
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full, len(prompt_ids)
    # The boundary merged: fall back to separately tokenised target tokens.
    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    return prompt_ids + target_ids, len(prompt_ids)


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    desc: str | None = None,
) -> list[TargetScore]:
    """Score every (prompt, target) pair; returns one `TargetScore` per pair, in order. With ``desc``, a progress
    bar of that name counts the pairs."""
    encoded = [encode_pair(tokenizer, p, t) for p, t in pairs]
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), encoded[i][1]))
    results: list[TargetScore | None] = [None] * len(encoded)
    pad = _pad_id(tokenizer)
    device = model_device(model)
    starts = range(0, len(order), batch_size)
    for start in track(starts, desc=desc or "", unit="batch", show=desc is not None):
        rows = order[start : start + batch_size]
        seqs = [encoded[i][0] for i in rows]
        n_prompt = torch.tensor([encoded[i][1] for i in rows])
        lengths = torch.tensor([len(s) for s in seqs])
        width = int(lengths.max())
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, seq in enumerate(seqs):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        # Logit at position t predicts token t+1: the target tokens [n_prompt, length) are predicted from
        # positions [n_prompt-1, length-1). Keep only the union of those spans over the batch.
        lo, hi = int(n_prompt.min()) - 1, int(lengths.max()) - 1
        keep = torch.arange(lo, hi)
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep.to(device)
        ).logits.float()  # (rows, hi - lo, vocab)
        logprobs = torch.log_softmax(logits, dim=-1)
        for r, i in enumerate(rows):
            pos = torch.arange(int(n_prompt[r]) - 1, int(lengths[r]) - 1)  # predicting positions
            tokens = ids[r, pos + 1].to(device)  # (n_target,)
            lp = logprobs[r, pos - lo]  # (n_target, vocab)
            nll = -lp.gather(1, tokens[:, None]).squeeze(1)
            correct = (lp.argmax(dim=-1) == tokens).float()
            results[i] = TargetScore(float(nll.mean()), float(correct.mean()), int(tokens.numel()))
    return [r for r in results if r is not None]
