"""`ensure_stats`: cached C0 per layer, computing the missing layers in one early-stopped pass over the corpus.

N = d_m · d_k keys per layer (arXiv 2506.04226: d_m = 2-10 recovers >= 95% of full-statistics editing quality).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fastedit.arch import ArchSpec, arch_for, mlp_out_matrix
from fastedit.models import cache_dir
from fastedit.models import model_name as loaded_name
from fastedit.stats import cache
from fastedit.stats.accumulate import ACCUMULATION, SecondMoment, accumulate
from fastedit.stats.corpus import Corpus, resolve_corpus
from fastedit.stats.distributed import all_reduce_sum, barrier, broadcast_rows, rank_and_world
from fastedit.stats.errors import CorpusError, StatsCacheError, StatsError
from fastedit.stats.keystats import KeyStats, condition_number
from fastedit.stats.layers import check_layers
from fastedit.stats.tokens import Batch, make_batches, plan_rows

log = logging.getLogger(__name__)

DEFAULT_DM = 10
DEFAULT_SEQ_LEN = 256
DEFAULT_BATCH_TOKENS = 4096  # tokens per forward; memory ~ batch_tokens · (d_model · a few + d_k · layers) floats
CHECKPOINT_SECONDS = 60.0  # how often a running job saves its partial sums (for --resume)


@dataclass
class LayerInfo:
    """How a layer's statistics were obtained (for the one-line summary)."""

    path: Path
    cached: bool
    seconds: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class StatsRun:
    stats: dict[int, KeyStats]
    info: dict[int, LayerInfo] = field(default_factory=dict)
    corpus: Corpus | None = None
    rank: int = 0


def parse_dm(dm: float | str) -> float | None:
    """d_m as a positive float, or None for 'full' (the whole corpus)."""
    if isinstance(dm, str):
        if dm.strip().lower() == "full":
            return None
        try:
            dm = float(dm)
        except ValueError:
            raise StatsError(f"d_m must be a positive number or 'full', got {dm!r}") from None
    value = float(dm)
    if not math.isfinite(value) or value <= 0:
        raise StatsError(f"d_m must be > 0 (N = d_m·d_k keys per layer; 2-10 is typical), got {dm!r}")
    return value


def dm_tag(dm: float | None) -> str:
    return "full" if dm is None else f"{dm:g}"


def n_keys(dm: float, d_k: int) -> int:
    return math.ceil(dm * d_k - 1e-9)


def default_stats_dir(name: str) -> Path:
    return cache_dir() / "stats" / cache.model_slug(name)


def _expected_metadata(
    model: Any, spec: ArchSpec, layer: int, d_k: int, name: str, src: Corpus, dm: float | None, seed: int, seq_len: int
) -> dict[str, str]:
    from fastedit import __version__

    return {
        "model": name,
        "model_type": spec.model_type,
        "model_fingerprint": cache.config_fingerprint(model),
        "layer_fingerprint": cache.layer_fingerprint(model, spec, layer),
        "layer": str(layer),
        "module": spec.path("mlp_out", layer),
        "d_k": str(d_k),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "accumulate_dtype": ACCUMULATION,
        "corpus": src.id,
        "corpus_kind": src.kind,
        "seed": str(seed),
        "dm": dm_tag(dm),
        "seq_len": str(seq_len),
        "fastedit_version": __version__,
    }


def _short_corpus_error(src: Corpus, total: int, need: int, dm: float, d_k: int, seq_len: int) -> CorpusError:
    supported = total / d_k
    hint = (
        f"pass --dm {math.floor(supported * 10) / 10:g} or a larger corpus" if supported >= 1 else "use a larger corpus"
    )
    return CorpusError(
        f"corpus {src.describe} has only {total} tokens (rows of {seq_len}), but d_m={dm:g} needs N = d_m·d_k = "
        f"{need} keys at d_k {d_k}; it supports d_m <= {supported:.2f}: {hint}"
    )


def _plan(
    src: Corpus,
    tokenizer: Any,
    seed: int,
    n_plan: int | None,
    dm: float | None,
    d_k: int,
    seq_len: int,
    progress: bool = True,
) -> list[torch.Tensor]:
    if tokenizer is None:
        raise StatsError("a tokenizer is needed to compute statistics; pass tokenizer=")
    if src.rows is not None and n_plan is not None:
        rows = src.rows(seed, n_plan, seq_len, progress)  # token rows from the source (model samples) as they are
    else:
        rows = plan_rows(tokenizer, src.documents(seed), n_plan, seq_len)
    total = sum(len(r) for r in rows)
    if total == 0:
        raise CorpusError(f"corpus {src.describe} contains no text; pass a corpus with documents in it")
    if n_plan is not None and total < n_plan:
        assert dm is not None
        raise _short_corpus_error(src, total, n_plan, dm, d_k, seq_len)
    return rows


def _resume_state(
    partials: dict[int, Path], expected: dict[int, dict[str, str]], cum_tokens: list[int]
) -> tuple[dict[int, torch.Tensor], int, int] | None:
    """(sums, tokens done, batches done) from matching partial files of every layer, else None."""
    loaded: dict[int, tuple[torch.Tensor, int]] = {}
    for layer, path in partials.items():
        if not path.exists():
            log.info("--resume: no partial file for layer %d; starting from the beginning", layer)
            return None
        total, count, meta = cache.read_partial(path)
        if any(meta.get(k) != expected[layer][k] for k in cache.IDENTITY_KEYS + cache.RUN_KEYS):
            log.warning("--resume: %s belongs to another model or run; starting from the beginning", path)
            return None
        loaded[layer] = (total, count)
    counts = {count for _, count in loaded.values()}
    if len(counts) != 1 or next(iter(counts)) not in cum_tokens:
        log.warning("--resume: partial files disagree with this run's batches; starting from the beginning")
        return None
    done = next(iter(counts))
    return {layer: t for layer, (t, _) in loaded.items()}, done, cum_tokens.index(done) + 1


def _compute(
    model: Any,
    tokenizer: Any,
    spec: ArchSpec,
    layers: list[int],
    src: Corpus,
    dm: float | None,
    seed: int,
    seq_len: int,
    batch_tokens: int,
    folder: Path,
    slug: str,
    tag: str,
    expected: dict[int, dict[str, str]],
    resume: bool,
    progress: bool,
) -> tuple[dict[int, KeyStats], dict[int, LayerInfo]]:
    rank, world = rank_and_world()
    d_ks = {layer: int(mlp_out_matrix(model, spec, layer).shape[1]) for layer in layers}
    targets = {layer: None if dm is None else n_keys(dm, d_k) for layer, d_k in d_ks.items()}
    n_plan = None if dm is None else max(t for t in targets.values() if t is not None)
    if world > 1 and len(set(targets.values())) > 1:
        raise StatsError(f"layers {layers} have different widths {d_ks}: run them separately under torchrun")
    if dm is None and not src.finite:
        raise StatsError(f"--dm full needs a finite corpus, and {src.describe} is endless; pass --corpus FILE")

    batches = _this_ranks_batches(
        lambda: _plan(src, tokenizer, seed, n_plan, dm, max(d_ks.values()), seq_len, progress),
        tokenizer, folder, batch_tokens, seq_len, rank, world,
    )  # fmt: skip
    total_tokens = sum(b.n_tokens for b in batches)
    moments = {layer: SecondMoment(d_ks[layer], targets[layer]) for layer in layers}

    partials = {layer: cache.stats_path(folder, slug, layer, tag, partial=True) for layer in layers}
    cum = list(torch.tensor([b.n_tokens for b in batches]).cumsum(0).tolist()) if batches else []
    skip, done_tokens = 0, 0
    if resume and world == 1:
        state = _resume_state(partials, expected, cum)
        if state is not None:
            sums, done_tokens, skip = state
            for layer, moment in moments.items():
                moment.sum.copy_(sums[layer])
                moment.count = done_tokens
            log.info("--resume: continuing after %d of %d tokens", done_tokens, total_tokens)
    elif resume:
        log.warning("--resume is ignored under torchrun (partial sums are saved by single-process runs only)")

    last_save = time.monotonic()

    def checkpoint(i: int) -> None:
        nonlocal last_save
        if world > 1 or skip + i + 1 >= len(batches) or time.monotonic() - last_save < CHECKPOINT_SECONDS:
            return
        for layer, moment in moments.items():
            cache.write_partial(moment.sum, moment.count, expected[layer], partials[layer])
        last_save = time.monotonic()

    start = time.perf_counter()
    accumulate(
        model,
        spec,
        moments,
        batches[skip:],
        progress=progress and rank == 0,
        total_tokens=total_tokens,
        initial_tokens=done_tokens,
        on_batch=checkpoint,
    )
    seconds = time.perf_counter() - start
    tokens_per_s = (total_tokens - done_tokens) * world / max(seconds, 1e-9)
    paths = {layer: cache.stats_path(folder, slug, layer, tag) for layer in layers}
    return _reduce_and_write(moments, targets, expected, paths, partials, seconds, tokens_per_s)


def _this_ranks_batches(
    plan: Callable[[], list[torch.Tensor]],
    tokenizer: Any,
    folder: Path,
    batch_tokens: int,
    seq_len: int,
    rank: int,
    world: int,
) -> list[Batch]:
    """Rank 0 plans the corpus rows and sends them to every rank; each rank keeps every world-th batch."""
    rows: list[torch.Tensor] | None = None
    if rank == 0:
        try:
            cache.check_writable(folder)
            rows = plan()
        except Exception:
            broadcast_rows(None)  # release the other ranks before failing
            raise
    rows = broadcast_rows(rows)
    if rows is None:
        raise StatsError("rank 0 could not prepare the corpus; see its error message")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return make_batches(rows, batch_tokens, seq_len, pad_id)[rank::world]


def _reduce_and_write(
    moments: dict[int, SecondMoment],
    targets: dict[int, int | None],
    expected: dict[int, dict[str, str]],
    paths: dict[int, Path],
    partials: dict[int, Path],
    seconds: float,
    tokens_per_s: float,
) -> tuple[dict[int, KeyStats], dict[int, LayerInfo]]:
    """Sum every rank's Σkkᵀ and key count, C0 = Σkkᵀ / n per layer; rank 0 writes it and drops the partial."""
    rank, _ = rank_and_world()
    stats: dict[int, KeyStats] = {}
    info: dict[int, LayerInfo] = {}
    for layer, moment in moments.items():
        count = int(all_reduce_sum(torch.tensor([moment.count], dtype=torch.long))[0])
        total = all_reduce_sum(moment.sum)
        if targets[layer] is not None and count != targets[layer]:
            raise StatsError(f"layer {layer}: counted {count} keys instead of {targets[layer]} (internal error)")
        mean = total / count
        meta = {
            **expected[layer],
            "count": str(count),
            "condition_number": f"{condition_number(mean):.6g}",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        stats[layer] = KeyStats(layer, mean, count, meta)
        if rank == 0:
            cache.write_stats(stats[layer], paths[layer])
            partials[layer].unlink(missing_ok=True)
        info[layer] = LayerInfo(paths[layer], False, seconds, tokens_per_s)
    barrier()
    return stats, info


def run_stats(
    model: Any,
    tokenizer: Any,
    layers: Sequence[int],
    *,
    dm: float | str = DEFAULT_DM,
    corpus: str | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    model_name: str | None = None,
    resume: bool = False,
    progress: bool = True,
    compute: bool = True,
    log_summary: bool = True,
) -> StatsRun:
    """`ensure_stats` plus how each layer was obtained (cache hit or computed, timings)."""
    spec = arch_for(model)
    layers = check_layers(layers, spec.n_layers(model.config))
    dm_value = parse_dm(dm)
    if seq_len < 2 or batch_tokens < 1:
        raise StatsError(f"--seq-len must be >= 2 and --batch-tokens >= 1 (got {seq_len}, {batch_tokens})")
    max_positions = spec.max_positions(model.config)
    if max_positions is not None and seq_len > max_positions:
        log.info("seq_len %d exceeds the model's %d positions: using %d", seq_len, max_positions, max_positions)
        seq_len = max_positions
    if dm_value is not None and dm_value < 2:
        log.warning(
            "d_m = %g < 2: C0 from fewer than 2·d_k keys is near-singular (d_m = 1 is the invertibility minimum "
            "and is known to fail); use --dm 2 or more",
            dm_value,
        )
    name = model_name or loaded_name(model)
    folder = Path(out).expanduser() if out is not None else default_stats_dir(name)
    slug = cache.model_slug(name)
    src = resolve_corpus(corpus, model, tokenizer)
    if src.row_tokens is not None and src.row_tokens < seq_len:
        log.info("%s: rows of %d tokens (not %d)", src.describe, src.row_tokens, seq_len)
        seq_len = src.row_tokens
    tag = f"{src.slug}.dm{dm_tag(dm_value)}.s{seed}.len{seq_len}"

    expected: dict[int, dict[str, str]] = {}
    run = StatsRun({}, corpus=src, rank=rank_and_world()[0])
    for layer in layers:
        d_k = int(mlp_out_matrix(model, spec, layer).shape[1])
        expected[layer] = _expected_metadata(model, spec, layer, d_k, name, src, dm_value, seed, seq_len)

    def load_cached(wanted: list[int]) -> list[int]:
        """Load the cached layers of ``wanted`` into ``run``; the ones still missing."""
        missing = []
        for layer in wanted:
            path = cache.stats_path(folder, slug, layer, tag)
            if path.exists():
                stats = cache.read_stats(path)
                cache.check_matches(stats.metadata, expected[layer], path)
                run.stats[layer] = stats
                run.info[layer] = LayerInfo(path, True)
            else:
                missing.append(layer)
        return missing

    missing = load_cached(list(layers))
    if missing:
        if not compute:
            raise StatsCacheError(
                f"no cached statistics for layer(s) {missing} of {name} in {folder} (corpus {src.describe}, "
                f"d_m {dm_tag(dm_value)}); run `fastedit precompute --model {name} --layers "
                f"{','.join(map(str, missing))}` or pass tokenizer= to compute them"
            )
        cache.check_writable(folder)
        # One process computes a given set of statistics at a time; the next one waits, then finds them cached.
        single = rank_and_world()[1] == 1
        with cache.compute_lock(folder / f"{slug}.{tag}") if single else contextlib.nullcontext():
            missing = load_cached(missing)
            if missing:
                log.info("computing C0 for layer(s) %s from %s (d_m %s)", missing, src.describe, dm_tag(dm_value))
                stats, info = _compute(
                    model, tokenizer, spec, missing, src, dm_value, seed, seq_len, batch_tokens, folder, slug, tag,
                    expected, resume, progress,
                )  # fmt: skip
                run.stats.update(stats)
                run.info.update(info)
    run.stats = {layer: run.stats[layer] for layer in layers}
    for layer in layers:
        log.log(logging.INFO if log_summary else logging.DEBUG, summary_line(run.stats[layer], run.info[layer]))
    return run


def ensure_stats(
    model: Any,
    tokenizer: Any,
    layers: Sequence[int],
    *,
    dm: float | str = DEFAULT_DM,
    corpus: str | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    model_name: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[int, KeyStats]:
    """C0 for every layer in ``layers``: cached files are loaded (and checked against the model), the missing
    layers are computed together in one forward pass per batch that stops after the last of them, then cached.

    ``corpus``: a local .txt/.jsonl/.parquet file or folder, a data-set name (``wikitext-2``), a HF dataset
    ``name:config`` (hub needed), ``"model"``, or None (the wikitext-2 data set when present, else text sampled
    from the model; logged and recorded in the metadata).
    ``dm``: keys per layer N = dm·d_k, or ``"full"`` for the whole corpus. ``out``: folder of the cache files
    (default ``cache_dir()/stats/<model>``). ``model_name`` names the model in file names and metadata.
    """
    return run_stats(
        model, tokenizer, layers, dm=dm, corpus=corpus, seed=seed, out=out, batch_tokens=batch_tokens,
        seq_len=seq_len, model_name=model_name, resume=resume, progress=progress,
    ).stats  # fmt: skip


def load_stats(model: Any, layer: int, *, tokenizer: Any = None, **kwargs: Any) -> KeyStats:
    """One layer's `KeyStats`; computed (and cached) only when a tokenizer is given, else it must be cached."""
    return run_stats(model, tokenizer, [layer], compute=tokenizer is not None, **kwargs).stats[layer]


def load_covariance(
    model: Any,
    layer: int,
    *,
    dm: float | str = DEFAULT_DM,
    corpus: str | None = None,
    out: str | Path | None = None,
    tokenizer: Any = None,
    seed: int = 0,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    model_name: str | None = None,
) -> KeyStats:
    """The raw statistics (C0 = mean k kᵀ, count, provenance) of ``layer``, ready for ``fastedit.edit(stats=...)``.

    Raw on purpose: the editors apply their hparams' λ and relative ε exactly once (`KeyStats.covariance(λ)`
    shows the regularised matrix). Loads the cache written by `ensure_stats` / `fastedit precompute` with the
    same arguments; computes it first when ``tokenizer`` is given, else a missing cache is a `StatsCacheError`
    saying which command makes it.
    """
    return load_stats(
        model, layer, tokenizer=tokenizer, dm=dm, corpus=corpus, out=out, seed=seed, seq_len=seq_len,
        batch_tokens=batch_tokens, model_name=model_name,
    )  # fmt: skip


def summary_line(stats: KeyStats, info: LayerInfo) -> str:
    meta = stats.metadata
    how = "cache hit" if info.cached else f"computed in {info.seconds:.1f} s ({info.tokens_per_second:,.0f} tok/s)"
    return (
        f"layer {stats.layer:>2}  {meta.get('module', '?')}  d_k {stats.d_k}  N {stats.count} (d_m {meta.get('dm')})"
        f"  cond(C0) {float(meta.get('condition_number', 'nan')):.3g}  {how}  -> {info.path}"
    )
