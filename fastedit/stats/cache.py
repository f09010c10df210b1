"""Cache files: one safetensors file per (model, layer, run), written atomically, checked before reuse.

A file holds ``mean`` (C0, float64, (d_k, d_k)) and ``count`` (N), plus string metadata: model name, config and
layer fingerprints, layer, module path, d_k, dtypes, corpus id, seed, d_m, seq_len, fastedit version, κ(C0).
A partial file (``*.partial.safetensors``) holds the running ``sum`` of an interrupted run for ``--resume``.

Reading checks what the editors rely on: ``mean`` is a finite, symmetric (d_k, d_k) matrix and ``count`` a positive
integer; anything else is refused with a message to delete the file, never reported as a cache hit.
Computing takes an exclusive lock (``flock`` on ``<file>.lock``): a second process asking for the same
statistics waits, then finds them cached instead of computing them again.

The layer fingerprint hashes the layer's MLP *input* projections, which determine the key, and not ``mlp_out``,
which editors change: statistics stay valid for a model edited in place, and are refused for another model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fastedit import atomic
from fastedit.arch import ArchSpec
from fastedit.errors import OutputError
from fastedit.stats.corpus import slugify
from fastedit.stats.errors import StatsCacheError, StatsError
from fastedit.stats.keystats import KeyStats

log = logging.getLogger(__name__)

FORMAT = "fastedit-keystats/1"
# Config entries that do not change the computation (names, paths, versions, dtype bookkeeping).
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_commit_hash",
}
_SAMPLE = 1 << 20  # elements hashed per weight: a strided sample keeps 7B-model layers fast


def model_slug(name: str) -> str:
    """Filename-safe model name: the alias or the last path part, plus a hash when it was a path."""
    base = name.rstrip("/").split("/")[-1] or "model"
    slug = slugify(base, 40)
    if "/" in name:
        slug += "-" + hashlib.sha256(name.encode()).hexdigest()[:6]
    return slug


def config_fingerprint(model: torch.nn.Module) -> str:
    raw = model.config.to_dict()
    clean = {k: v for k, v in raw.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _hash_tensor(digest: Any, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    sample = flat[::step].to(device="cpu", dtype=torch.float32).contiguous()
    digest.update(str(tuple(tensor.shape)).encode())
    digest.update(sample.numpy().tobytes())


def layer_fingerprint(model: torch.nn.Module, spec: ArchSpec, layer: int) -> str:
    """Hash of the layer's MLP input projection weights (they, with earlier layers, make the key)."""
    digest = hashlib.sha256()
    for name in spec.paths("mlp_in", layer):
        _hash_tensor(digest, model.get_submodule(name).weight)
    return digest.hexdigest()[:16]


def stats_path(folder: Path, slug: str, layer: int, run_tag: str, partial: bool = False) -> Path:
    suffix = ".partial.safetensors" if partial else ".safetensors"
    return folder / f"{slug}.layer{layer:02d}.{run_tag}{suffix}"


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, before any work is done."""
    try:
        atomic.check_writable(folder, "statistics")
    except OutputError as exc:
        raise StatsError(f"{exc}; pass --out to a writable folder") from None


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    atomic.save_safetensors(path, tensors, metadata)


@contextlib.contextmanager
def compute_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock``, waiting while another process holds it.

    The holder deletes the lock file before releasing it (no file is left behind); a waiter that then gets the
    lock of the deleted file notices (its inode is no longer the path's) and locks the current file instead.
    """
    lock = path.with_name(path.name + ".lock")
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is computing %s; waiting for it", path.name)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            current = os.stat(lock).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the holder deleted this file before releasing it: lock the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)  # closing releases the lock


def write_stats(stats: KeyStats, path: Path) -> None:
    meta = {**stats.metadata, "format": FORMAT, "layer": str(stats.layer), "count": str(stats.count)}
    _atomic_save({"mean": stats.mean, "count": torch.tensor([stats.count], dtype=torch.long)}, meta, path)


def write_partial(total: torch.Tensor, count: int, metadata: dict[str, str], path: Path) -> None:
    meta = {**metadata, "format": FORMAT + "-partial", "count": str(count)}
    _atomic_save({"sum": total, "count": torch.tensor([count], dtype=torch.long)}, meta, path)


def _open(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise StatsCacheError(f"statistics file {path} is unreadable ({exc}); delete it and run again") from None
    return meta, tensors


def read_stats(path: Path) -> KeyStats:
    meta, tensors = _open(path)
    if meta.get("format") != FORMAT or "mean" not in tensors or "count" not in tensors:
        raise StatsCacheError(f"{path} is not a fastedit statistics file (format {meta.get('format')!r})")
    mean, count = tensors["mean"], tensors["count"]
    bad = _check_content(mean, count, meta)
    if bad:
        raise StatsCacheError(f"statistics file {path} is damaged ({bad}); delete it and run again to recompute it")
    return KeyStats(int(meta["layer"]), mean, int(count[0]), meta)


def _check_content(mean: torch.Tensor, count: torch.Tensor, meta: dict[str, str]) -> str | None:
    """What is wrong with a loaded C0 (None when it is usable)."""
    d_k = meta.get("d_k", "")
    if not d_k.isdigit() or not meta.get("layer", "").isdigit():
        return f"metadata d_k {d_k!r} / layer {meta.get('layer')!r} are not integers"
    if tuple(mean.shape) != (int(d_k), int(d_k)):
        return f"C0 has shape {tuple(mean.shape)}, expected ({d_k}, {d_k})"
    if not mean.is_floating_point():
        return f"C0 has dtype {mean.dtype}"
    if count.numel() != 1 or count.is_floating_point() or int(count[0]) < 1:
        return f"count {count.tolist()} is not a positive integer"
    if not torch.isfinite(mean).all():
        return "C0 holds NaN or infinite values"
    if not torch.allclose(mean, mean.T, rtol=1e-6, atol=1e-12 * float(mean.abs().max())):
        return "C0 is not symmetric"
    return None


def read_partial(path: Path) -> tuple[torch.Tensor, int, dict[str, str]]:
    meta, tensors = _open(path)
    if meta.get("format") != FORMAT + "-partial" or "sum" not in tensors:
        raise StatsCacheError(f"{path} is not a fastedit partial statistics file; delete it")
    return tensors["sum"], int(tensors["count"][0]), meta


IDENTITY_KEYS = ("model_fingerprint", "layer_fingerprint", "d_k", "layer")
RUN_KEYS = ("corpus", "seed", "dm", "seq_len")


def check_matches(meta: dict[str, str], expected: dict[str, str], path: Path) -> None:
    """Refuse a cache file made for another model, width or run, saying what differs and what to do."""
    if meta.get("d_k") != expected["d_k"]:
        raise StatsCacheError(
            f"{path} holds statistics of width d_k={meta.get('d_k')} but layer {expected['layer']} of "
            f"{expected['model']} has d_k={expected['d_k']}: it was made for another model; delete it or use --out"
        )
    for key in IDENTITY_KEYS + RUN_KEYS:
        if meta.get(key) != expected[key]:
            raise StatsCacheError(
                f"{path} was made for a different model or run ({key} {meta.get(key)!r} != {expected[key]!r}; "
                f"file made for {meta.get('model')!r}): refusing to reuse it; delete it or pass another --out folder"
            )
