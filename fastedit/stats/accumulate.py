"""Single-pass, multi-layer accumulation of Σ k kᵀ: a float32 product per batch on one triangle of blocks, a
float64 sum across batches.

One forward per batch captures the key (the input of ``mlp_out``) at every requested layer and stops right after
the last one's ``mlp_out`` (no later layers, no logits). Keys at non-padding positions are folded into a float64
running sum and dropped: memory is d_k² · 8 bytes per layer plus one batch of activations.

Why float32 per batch: a float64 GEMM runs at about half the float32 rate and needs a float64 copy of the keys,
which made the accumulation ~30 % of the pass. A batch holds a few thousand keys; their float32 sum kᵀk carries a
relative error of ~1e-7 (BLAS sums in blocks), and adding the batches in float64 keeps the error from growing
with N. C0 agrees with an all-float64 sum to ~1e-7 in relative Frobenius norm (tests/test_stats.py).

Why blocks: kᵀk is symmetric, so only the blocks on and above the diagonal are multiplied (kᵢᵀkⱼ, i ≤ j, on
column blocks of TRIANGLE_BLOCK) and each one below is copied from its mirror: b(b+1)/2 of b² products, ~0.6 of
the full GEMM's time at d_k 1,536-2,048 (blocks of 256 keep each GEMM large enough to run at full rate).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastedit.arch import ArchSpec, capture, model_device
from fastedit.progress import bar as progress_bar
from fastedit.stats.errors import StatsError
from fastedit.stats.tokens import Batch

log = logging.getLogger(__name__)


ACCUMULATION = "float32 per batch, float64 across batches"  # recorded in the cache metadata
TRIANGLE_BLOCK = 256  # columns per block of the upper-triangle product


def add_gram(total: torch.Tensor, k: torch.Tensor, block: int = TRIANGLE_BLOCK) -> None:
    """total (d, d) += kᵀk for k (n, d), multiplying only the blocks on and above the diagonal.

    Each product kᵢᵀkⱼ (i ≤ j) is formed in k's dtype and added to total's upper block; the lower block
    (j, i) then receives its transpose, so every reader (checkpoints, the all-reduce, C0) sees the full matrix.
    """
    d = k.shape[1]
    spans = list(itertools.pairwise([*range(0, d, block), d]))  # column blocks [start, end)
    for a, (a0, a1) in enumerate(spans):
        left = k[:, a0:a1]
        for b0, b1 in spans[a:]:
            upper = total[a0:a1, b0:b1]
            upper.add_((left.T @ k[:, b0:b1]).to(total.device))
            if b0 != a0:
                total[b0:b1, a0:a1] = upper.T


@dataclass
class SecondMoment:
    """Running S = Σ k kᵀ (float64, (d_k, d_k)) over at most ``target`` keys; later keys are ignored.

    ``exact=True`` forms every batch's product in float64 too (the reference the float32 path is checked against).
    """

    d_k: int
    target: int | None = None  # None: no limit (--dm full)
    exact: bool = False
    sum: torch.Tensor = field(init=False)
    count: int = 0
    seconds: float = 0.0  # time spent in the update alone (benchmarks report it)

    def __post_init__(self) -> None:
        self.sum = torch.zeros(self.d_k, self.d_k, dtype=torch.float64)

    @property
    def full(self) -> bool:
        return self.target is not None and self.count >= self.target

    def add(self, keys: torch.Tensor) -> None:
        """keys: (n, d_k) in any float dtype; S += kᵀk over the first (target - count) rows.

        kᵀk (d_k, n) @ (n, d_k) in float32 (float64 when ``exact`` or the keys are float64) on one triangle of
        blocks (`add_gram`), added to S in float64.
        """
        if self.target is not None:
            keys = keys[: max(0, self.target - self.count)]
        if keys.shape[0] == 0:
            return
        start = time.perf_counter()
        dtype = torch.float64 if self.exact or keys.dtype == torch.float64 else torch.float32
        k = keys.to(dtype=dtype)  # bf16/fp16 products are exact in float32
        add_gram(self.sum, k)  # add_ widens to float64 element-wise, no float64 copy of the keys
        self.seconds += time.perf_counter() - start
        self.count += int(keys.shape[0])

    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


@torch.no_grad()
def accumulate(
    model: torch.nn.Module,
    spec: ArchSpec,
    moments: dict[int, SecondMoment],
    batches: Sequence[Batch],
    *,
    progress: bool = True,
    total_tokens: int | None = None,
    initial_tokens: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Fold every batch's keys into ``moments`` (layer -> SecondMoment), one early-stopped forward per batch.

    ``on_batch(i)`` runs after batch i is folded in (checkpoints). Raises `StatsError` naming the layer when a key
    is NaN/Inf, before anything is written.
    """
    names = {layer: spec.path("mlp_out", layer) for layer in moments}
    stop = names[max(moments)]
    device = model_device(model)
    bar = progress_bar(
        total=total_tokens,
        initial=initial_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"keys at layers {','.join(map(str, sorted(moments)))}",
        show=progress,
    )
    try:
        for i, batch in enumerate(batches):
            mask = batch.attention_mask.to(device)
            with capture(model, names.values(), inputs=True, outputs=False, stop_after=stop) as rec:
                model(input_ids=batch.input_ids.to(device), attention_mask=mask, use_cache=False)
            keep = None if bool(mask.all()) else mask.bool()  # only a last, short batch has padding
            for layer, moment in moments.items():
                captured: Any = rec[names[layer]].input
                if captured is None:
                    raise StatsError(f"layer {layer}: {names[layer]} did not run during the forward pass")
                # (n, d_k): non-padding positions in token order (a view, no copy, when nothing is padded)
                keys = captured.reshape(-1, captured.shape[-1]) if keep is None else captured[keep]
                moment.add(keys)
                # A NaN/Inf key makes its Σ k² on the diagonal non-finite for good: O(d_k) instead of O(n·d_k).
                if not torch.isfinite(moment.sum.diagonal()).all():
                    raise StatsError(
                        f"non-finite (NaN/Inf) keys at layer {layer} ({names[layer]}); the model produces invalid "
                        "activations there: check its weights and dtype (float32 is the safe choice)"
                    )
            bar.update(batch.n_tokens)
            if on_batch is not None:
                on_batch(i)
    finally:
        bar.close()
