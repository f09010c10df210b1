"""What `fastedit precompute` runs: load the model, pick the layers, ensure the statistics, summarise."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from fastedit.arch import arch_for
from fastedit.stats.corpus import check_corpus
from fastedit.stats.distributed import process_group
from fastedit.stats.errors import StatsError
from fastedit.stats.keystats import KeyStats, condition_number
from fastedit.stats.layers import check_layer_list, default_layers, layers_from_hparams
from fastedit.stats.precompute import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_DM,
    DEFAULT_SEQ_LEN,
    LayerInfo,
    parse_dm,
    run_stats,
    summary_line,
)

log = logging.getLogger(__name__)


@dataclass
class PrecomputeReport:
    stats: dict[int, KeyStats]
    info: dict[int, LayerInfo]
    layers_source: str
    corpus: str
    eps: float | None = None
    rank: int = 0
    lines: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line per layer (empty on ranks other than 0 under torchrun)."""
        return "\n".join(self.lines) if self.rank == 0 else ""


def precompute(
    model: str,
    *,
    dm: float | str = DEFAULT_DM,
    layers: list[int] | None = None,
    hparams: str | Path | None = None,
    corpus: str | None = None,
    eps: float | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    out: str | Path | None = None,
    resume: bool = False,
    seed: int = 0,
    progress: bool = True,
    device: str | None = None,
    dtype: str | None = None,
) -> PrecomputeReport:
    """Load ``model`` and ensure C0 at ``layers`` (else the hparams file's layers, else the family default).

    With ``eps`` (relative, like the editors' ``rel_eps``), the summary also reports κ(C0 + ε·mean eig(C0)·I),
    the conditioning the editors' regularised C has.
    """
    from fastedit.models import load_model, placement

    # Everything checkable without the model fails here, before it loads.
    if layers is not None and hparams is not None:
        raise StatsError("pass either --layers or --hparams (whose layers are used), not both")
    parse_dm(dm)
    check_corpus(corpus)
    where, dtype_ = placement(device, dtype)
    if layers is not None:
        layers, source = check_layer_list(layers), "--layers"
    elif hparams is not None:
        layers, source = layers_from_hparams(hparams), str(hparams)
    # Under torchrun the group is started here and left (barrier, then destroyed) before the process exits: a
    # gloo rank that exits with its group alive while a peer is still tearing down can abort that peer.
    with process_group():
        loaded, tokenizer = load_model(model, device=where, dtype=dtype_)
        if layers is None:
            layers, source = default_layers(loaded, arch_for(loaded), model)
        log.info("layers %s (from %s)", layers, source)
        run = run_stats(
            loaded, tokenizer, layers, dm=dm, corpus=corpus, seed=seed, out=out, batch_tokens=batch_tokens,
            seq_len=seq_len, model_name=model, resume=resume, progress=progress, log_summary=False,
        )  # fmt: skip
    report = PrecomputeReport(run.stats, run.info, source, run.corpus.describe if run.corpus else "", eps, run.rank)
    report.lines.append(f"{model}: layers {','.join(map(str, run.stats))} ({source}); corpus {report.corpus}")
    for layer, stats in run.stats.items():
        line = summary_line(stats, run.info[layer])
        if eps is not None:
            ridge = eps * float(stats.mean.diagonal().mean())
            line += f"  cond(C0+{eps:g}·tr/d·I) {condition_number(stats.mean, ridge):.3g}"
        report.lines.append(line)
    return report
