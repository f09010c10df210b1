"""Generation fluency: weighted n-gram entropy of sampled continuations (ROME/MEMIT's measure).

entropy(text) = mean(2/3 · H₂, 4/3 · H₃), Hₙ the entropy in bits of the text's n-gram frequency distribution
(words and punctuation as tokens). A model that repeats itself after an edit scores lower.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from fastedit.arch import model_device
from fastedit.arch.forward import last_logits_only

_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Arithmetic mean over n of weight_n · H_n(text) in bits; 0 for texts shorter than n words."""
    words = _WORD.findall(text)
    parts = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        parts.append(weight * h)
    return sum(parts) / len(parts)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 8,
) -> list[str]:
    """Seeded top-k samples (the reference uses top-k 5), one continuation per prompt, prompt excluded."""
    device = model_device(model)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    last_only = last_logits_only(model)  # else the prefill hands the head a strided view (a slow CPU path)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                top_k=top_k,
                pad_token_id=pad,
                **last_only,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        torch.random.set_rng_state(generator_state)
    return texts
