"""`fastedit edit FILE`: load the model and requests, edit, evaluate, and write the run folder.

The run folder holds metrics.json (pre/post summary, n, method, model, timings), cases.jsonl (per case),
patch.safetensors and run.json (resolved options, hparams, stats provenance, versions). Every file is written
to a temp file and renamed, so a crash never leaves a half-written output.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastedit.config import config_to_dict
from fastedit.errors import ConfigError
from fastedit.models import DEFAULT_MODEL

log = logging.getLogger(__name__)

METHODS = ("memit", "rome", "emmet", "alphaedit")


@dataclass(frozen=True)
class EditRunOptions:
    """Everything `fastedit edit` takes; recorded in run.json."""

    file: str
    model: str = DEFAULT_MODEL
    method: str = "memit"
    hparams: str | None = None  # hparams file (default: hparams/<method>/<model or family>.json)
    n: int | None = None  # first n valid requests
    batch_size: int | None = None  # requests per closed-form solve (None: all at once)
    dm: str = "10"  # keys per layer N = dm·d_k, or "full"
    corpus: str | None = None  # covariance corpus (see fastedit.stats.ensure_stats)
    stats_dir: str | None = None  # covariance cache folder (default: the fastedit cache)
    out: str | None = None  # run folder (default: runs/<timestamp>-<model>-<method>)
    save_patch: str | None = None  # an extra copy of the patch
    save_model: str | None = None  # save_pretrained of the edited model
    seed: int = 0
    skip_invalid: bool = False  # drop invalid request records instead of failing
    fluency: bool = False  # also measure generation n-gram entropy (slow)
    eval_batch_size: int = 16
    trust_remote_code: bool = False
    targets_cache: str | None = None  # v* targets cache folder (default: the fastedit cache); "" disables it
    device: str | None = None  # auto (CUDA, else MPS, else CPU), cpu, cuda[:N], mps
    dtype: str | None = None  # float32 (default), bfloat16, float16, float64


@dataclass
class EditRunReport:
    out: Path
    metrics: dict[str, Any]
    table: str


def parse_dm(value: str | float) -> float | str:
    """ "full", or a positive number of keys per key dimension (d_m)."""
    if isinstance(value, str) and value.strip().lower() == "full":
        return "full"
    try:
        dm = float(value)
    except ValueError:
        raise ConfigError(f"--dm {value!r} is neither a number nor 'full'") from None
    if dm <= 0:
        raise ConfigError(f"--dm must be positive, got {value}")
    return int(dm) if dm.is_integer() else dm


def default_out(model: str, method: str, root: str | Path = "runs") -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.rstrip("/")).name or model).strip("-") or "model"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{slug}-{method}"


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; give the file the usual umask-based mode
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


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
    if folder.exists():
        raise ConfigError(f"--save-model folder {str(folder)!r} already exists; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Load, edit, evaluate before/after and write the run folder; returns the metrics and a printable table."""
    from fastedit.editing.api import edit
    from fastedit.editing.hparams import load_hparams
    from fastedit.models import load_model, placement
    from fastedit.requests import load_requests

    if options.method not in METHODS:
        raise ConfigError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    start = time.perf_counter()
    placement(options.device, options.dtype)  # a bad --device/--dtype fails before anything loads
    dm = parse_dm(options.dm)
    parsed = load_requests(options.file, n=options.n, skip_invalid=options.skip_invalid)  # fail before loading
    out = Path(options.out) if options.out else default_out(options.model, options.method)
    if (out / "metrics.json").exists():
        raise ConfigError(f"run folder {str(out)!r} already holds a run; choose another --out")
    if options.save_model and Path(options.save_model).exists():
        raise ConfigError(f"--save-model folder {options.save_model!r} already exists; choose a new folder")

    t = time.perf_counter()
    device, dtype = placement(options.device, options.dtype)
    model, tokenizer = load_model(
        options.model, device=device, dtype=dtype, trust_remote_code=options.trust_remote_code
    )
    load_seconds = time.perf_counter() - t
    hp = load_hparams(options.method, model, options.hparams)
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

    out.mkdir(parents=True, exist_ok=True)
    outcome.save_patch(out / "patch.safetensors")
    if options.save_patch:
        outcome.save_patch(options.save_patch)
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
    write_atomic(out / "cases.jsonl", "".join(json.dumps(c, default=str) + "\n" for c in cases))
    write_atomic(
        out / "run.json",
        _json(
            {
                "options": asdict(options),
                "dm": dm,
                "layout": parsed.layout,
                "skipped_records": parsed.skipped,
                "hparams": config_to_dict(hp),
                "stats": outcome.info["stats"],
                "engine": outcome.info["batches"],
                "versions": _versions(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        ),
    )
    if options.save_model:
        _save_model(model, tokenizer, Path(options.save_model))
    timings["total"] = time.perf_counter() - start
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
    write_atomic(out / "metrics.json", _json(metrics))  # last: its presence marks a complete run
    return EditRunReport(out, metrics, format_table(metrics) + f"\noutputs: {out}")
