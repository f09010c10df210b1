"""`fastedit edit FILE`: load the model and requests, edit, evaluate, and write the run folder.

The run folder holds metrics.json (pre/post summary, n, method, model, timings), cases.jsonl (per case),
patch.safetensors and run.json (resolved options, hparams, stats provenance, versions). The folder is written
as one unit (a temp folder renamed into place at the end): an interrupted run leaves nothing at ``--out``.

Everything that can be checked without the model is checked before it loads: the options, the hparams file,
the request file, and that ``--out`` / ``--save-patch`` / ``--save-model`` can be written and hold no earlier
result (replaced only with ``--overwrite``).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import secrets
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastedit.atomic import atomic_folder, check_new_path, check_writable, is_occupied, write_text
from fastedit.config import config_to_dict
from fastedit.editing.hparams import METHODS
from fastedit.errors import ConfigError, OutputError
from fastedit.models import DEFAULT_MODEL
from fastedit.progress import set_enabled
from fastedit.stats.corpus import check_corpus
from fastedit.stats.distributed import process_group

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditRunOptions:
    """Everything `fastedit edit` takes; recorded in run.json."""

    file: str
    model: str = DEFAULT_MODEL
    method: str = "memit"
    hparams: str | None = None  # file or shipped variant name (default: hparams/<method>/<model or family>.json)
    n: int | None = None  # first n valid requests
    batch_size: int | None = None  # requests per closed-form solve (None: all at once)
    dm: str = "10"  # keys per layer N = dm·d_k, or "full"
    corpus: str | None = None  # covariance corpus (see fastedit.stats.ensure_stats)
    stats_dir: str | None = None  # covariance cache folder (default: the fastedit cache)
    out: str | None = None  # run folder (default: runs/<time>-<model>-<method>-<pid><random>)
    save_patch: str | None = None  # an extra copy of the patch
    overwrite: bool = False  # replace an existing --out run folder / --save-patch file
    save_model: str | None = None  # save_pretrained of the edited model
    seed: int = 0
    skip_invalid: bool = False  # drop invalid request records instead of failing
    fluency: bool = False  # also measure generation n-gram entropy (slow)
    eval_batch_size: int = 16
    trust_remote_code: bool = False
    targets_cache: str | None = None  # v* targets cache folder (default: the fastedit cache); "" disables it
    device: str | None = None  # auto (CUDA, else MPS, else CPU), cpu, cuda[:N], mps
    dtype: str | None = None  # float32 (default), bfloat16, float16, float64
    workers: int = 1  # local processes sharing the v* requests and the evaluation (see workers.py)


@dataclass
class EditRunReport:
    out: Path
    metrics: dict[str, Any]
    table: str  # empty on ranks other than 0 of a process group: one rank prints


def parse_dm(value: str | float) -> float | str:
    """ "full", or a finite positive number of keys per key dimension (d_m)."""
    from fastedit.stats.precompute import parse_dm as parse_stats_dm

    dm = parse_stats_dm(value)
    if dm is None:
        return "full"
    return int(dm) if dm.is_integer() else dm


def default_out(model: str, method: str, root: str | Path = "runs") -> Path:
    """runs/<date-time.microseconds>-<model>-<method>-<pid><random>: two runs never share a folder."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.rstrip("/")).name or model).strip("-") or "model"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return Path(root) / f"{stamp}-{slug}-{method}-{os.getpid()}{secrets.token_hex(2)}"


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from fastedit import __version__

    return {
        "fastedit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def format_table(metrics: dict[str, Any]) -> str:
    """A short pre/post table of the summary metrics a run defines."""
    rows = [
        ("ES", "es"),
        ("PS", "ps"),
        ("NS", "ns"),
        ("Score", "score"),
        ("EM", "em"),
        ("PM", "pm"),
        ("NM", "nm"),
        ("rewrite acc", "rewrite_acc"),
        ("paraphrase acc", "paraphrase_acc"),
        ("neighbourhood acc", "neighborhood_acc"),
        ("fluency", "fluency"),
    ]
    pre, post = metrics.get("pre") or {}, metrics.get("post") or {}

    def cell(value: Any) -> str:
        return f"{value:8.1f}" if isinstance(value, (int, float)) else f"{'-':>8}"

    lines = [f"{metrics['method']} on {metrics['model']}, {metrics['n']} requests", f"{'':18}{'pre':>8}{'post':>8}"]
    for label, key in rows:
        if pre.get(key) is not None or post.get(key) is not None:
            lines.append(f"{label:18}{cell(pre.get(key))}{cell(post.get(key))}")
    t = metrics.get("timings", {})
    lines.append(
        f"time: edit {t.get('edit', 0):.1f} s, eval {t.get('eval_pre', 0) + t.get('eval_post', 0):.1f} s, "
        f"total {t.get('total', 0):.1f} s"
    )
    return "\n".join(lines)


def _save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """save_pretrained into a temp folder next to ``folder``, then rename it into place."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def check_outputs(options: EditRunOptions) -> Path:
    """The run folder (chosen now), after proving every output can be written and replaces nothing unasked."""
    out = Path(options.out) if options.out else default_out(options.model, options.method)
    if is_occupied(out) and not options.overwrite:
        held = "already holds a run" if (out / "metrics.json").exists() else "already exists and is not empty"
        raise OutputError(f"run folder {str(out)!r} {held}; choose another --out or pass --overwrite")
    check_writable(out.parent, "the run folder")
    if options.save_patch:
        check_new_path(options.save_patch, "--save-patch file", overwrite=options.overwrite)
    if options.save_model:
        if Path(options.save_model).exists():
            raise OutputError(f"--save-model folder {options.save_model!r} already exists; choose a new folder")
        check_writable(Path(options.save_model).parent, "--save-model")
    return out


def _hparams_before_loading(options: EditRunOptions) -> Any:
    """An explicit --hparams file or shipped variant (found by the model's name), loaded and validated strictly
    (None: looked up once the model is known)."""
    if options.hparams is None:
        return None
    from fastedit.editing.hparams import is_variant_name, load_hparams

    if is_variant_name(options.hparams):
        return load_hparams(options.method, options.model, variant=options.hparams)
    return load_hparams(options.method, None, options.hparams)


def _targets_folder(options: EditRunOptions) -> Path | None:
    """Where v* targets are cached: --targets-cache, else <fastedit cache>/targets/<model>; None when disabled."""
    if options.targets_cache == "":
        return None
    if options.targets_cache:
        return Path(options.targets_cache)
    from fastedit.models import cache_dir
    from fastedit.stats.cache import model_slug

    return cache_dir() / "targets" / model_slug(options.model)


def run_edit(options: EditRunOptions) -> EditRunReport:
    """Load, edit, evaluate before/after and write the run folder; returns the metrics and a printable table.

    Under torchrun, or with ``options.workers`` > 1 (that many local processes), the v* requests and the
    evaluation cases are split across the ranks; rank 0 logs, writes the outputs and returns the table."""
    from fastedit.editing.workers import check_workers, run_in_workers

    start = time.perf_counter()
    workers = check_workers(options.workers)
    checked = _check_before_loading(options)
    if workers == 1:
        return _run_on_ranks(checked, start)
    # The workers repeat the checks (cheap) and write to the run folder chosen here.
    run_in_workers(_worker_run, replace(checked.options, out=str(checked.out)), workers)
    metrics = json.loads((checked.out / "metrics.json").read_text(encoding="utf-8"))
    return EditRunReport(checked.out, metrics, format_table(metrics) + f"\noutputs: {checked.out}")


@dataclass
class _Checked:
    """What `_check_before_loading` proved and parsed."""

    options: EditRunOptions
    parsed: Any  # the loaded requests
    out: Path
    explicit_hp: Any
    dm: float | str


def _check_before_loading(options: EditRunOptions) -> _Checked:
    """Everything checkable without the model, so it fails before the slow part."""
    from fastedit.models import placement
    from fastedit.requests import load_requests

    if options.method not in METHODS:
        raise ConfigError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    placement(options.device, options.dtype)  # a bad --device/--dtype fails before anything loads
    dm = parse_dm(options.dm)
    explicit_hp = _hparams_before_loading(options)
    check_corpus(options.corpus)
    parsed = load_requests(options.file, n=options.n, skip_invalid=options.skip_invalid)
    return _Checked(options, parsed, check_outputs(options), explicit_hp, dm)


def _worker_run(options: EditRunOptions) -> None:
    """One worker of ``--workers``: the whole run inside the process group the launcher started."""
    _run_on_ranks(_check_before_loading(options), time.perf_counter())


def _run_on_ranks(checked: _Checked, start: float) -> EditRunReport:
    """The run in this process: alone, or as one rank of a process group (torchrun's, or the workers')."""
    with process_group() as (rank, world):
        if rank > 0:  # one rank reports: the others log warnings only and show no bars
            logging.getLogger("fastedit").setLevel(logging.WARNING)
            set_enabled(False)
        return _edit_and_write(checked, start, primary=rank == 0, world=world)


def _edit_and_write(checked: _Checked, start: float, *, primary: bool, world: int) -> EditRunReport:
    """Load the model, edit and evaluate; the ``primary`` rank writes the run folder and the extra outputs."""
    import torch

    from fastedit.editing.api import edit
    from fastedit.editing.hparams import load_hparams
    from fastedit.models import load_model, placement

    options, parsed, out, dm = checked.options, checked.parsed, checked.out, checked.dm
    t = time.perf_counter()
    device, dtype = placement(options.device, options.dtype)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # each rank on its own GPU
    model, tokenizer = load_model(
        options.model, device=device, dtype=dtype, trust_remote_code=options.trust_remote_code
    )
    load_seconds = time.perf_counter() - t
    hp = checked.explicit_hp or load_hparams(options.method, model)
    outcome = edit(
        model,
        tokenizer,
        parsed.requests,
        method=options.method,
        hparams=hp,
        dm=dm,
        corpus=options.corpus,
        stats_dir=options.stats_dir,
        batch_size=options.batch_size,
        eval_batch_size=options.eval_batch_size,
        fluency=options.fluency,
        seed=options.seed,
        model_name=options.model,
        targets_cache=_targets_folder(options),
    )
    assert outcome.pre is not None and outcome.post is not None
    timings = {"load_model": load_seconds, **outcome.info["timings"]}
    timings["edit_per_request"] = timings["edit"] / len(parsed.requests)

    cases = []
    for request, pre, post in zip(parsed.requests, outcome.pre.cases, outcome.post.cases, strict=True):
        cases.append(
            {
                "case_id": request.case_id,
                "subject": request.subject,
                "prompt": request.prompt,
                "target_new": request.target_new,
                "target_true": request.target_true,
                "pre": {k: v for k, v in pre.items() if k != "case_id"},
                "post": {k: v for k, v in post.items() if k != "case_id"},
            }
        )
    run_record = {
        "options": asdict(options),
        "dm": dm,
        "layout": parsed.layout,
        "skipped_records": parsed.skipped,
        "hparams": config_to_dict(hp),
        "stats": outcome.info["stats"],
        "engine": outcome.info["batches"],
        "versions": _versions(),
        "processes": world,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    metrics = {
        "model": options.model,
        "method": options.method,
        "n": len(parsed.requests),
        "layout": parsed.layout,
        "batch_size": options.batch_size,
        "dm": dm,
        "pre": outcome.pre.summary,
        "post": outcome.post.summary,
        "timings": timings,
    }
    timings["total"] = time.perf_counter() - start
    if not primary:
        return EditRunReport(out, metrics, "")
    with atomic_folder(out, overwrite=options.overwrite) as folder:  # all four files, or none
        outcome.save_patch(folder / "patch.safetensors")
        write_text(folder / "cases.jsonl", "".join(json.dumps(c, default=str) + "\n" for c in cases))
        write_text(folder / "run.json", _json(run_record))
        write_text(folder / "metrics.json", _json(metrics))
    if options.save_patch:  # checked before loading; refused here only if it appeared meanwhile
        outcome.patch.save(options.save_patch, overwrite=options.overwrite)
    if options.save_model:
        _save_model(model, tokenizer, Path(options.save_model))
    return EditRunReport(out, metrics, format_table(metrics) + f"\noutputs: {out}")
