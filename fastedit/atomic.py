"""Atomic writes, the only place fastedit creates output files: a file or folder appears complete or not at all.

A file is written to a hidden temp file in the same folder and renamed over the target (``os.replace`` is atomic
on one filesystem); ``overwrite=False`` instead links the temp file to the target, which fails if the target
exists, so an earlier result is never replaced unasked even by a concurrent writer. A folder is written into a
hidden temp folder (`atomic_folder`) and renamed into place at the end; an interrupt removes the temp folder.
Before a rename the new files' contents are flushed to the disk (fsync), and the rename itself after it: a rename
can otherwise reach the disk before the data, and a crash then leaves a complete-looking name over empty files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fastedit.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives under the current umask (mkstemp makes 0600)."""
    return 0o666 & ~_umask()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to the disk; folders that cannot be opened (Windows) are not."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not path.is_dir() or exc.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder from the deepest up (entries before their parent)."""
    folders = [folder]
    for root, dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        folders.extend(Path(root) / d for d in dirs)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _fsync(path)


def _commit_file(tmp: Path, path: Path, overwrite: bool) -> None:
    os.chmod(tmp, file_mode())
    _fsync(tmp)
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails with EEXIST instead of replacing
    except FileExistsError:
        raise OutputError(f"{str(path)!r} already exists; choose another path or pass --overwrite") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):  # no hard links here: check, then rename
            raise
        if path.exists():
            raise OutputError(f"{str(path)!r} already exists; choose another path or pass --overwrite") from None
        os.replace(tmp, path)


def write_with(path: str | Path, writer: Callable[[Path], Any], *, overwrite: bool = True) -> Path:
    """Call ``writer(tmp_path)`` to fill a temp file next to ``path``, then move it to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer(tmp)
        _commit_file(tmp, path, overwrite)
        _fsync(path.parent)  # the new name
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)


def write_bytes(path: str | Path, data: bytes, *, overwrite: bool = True) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)


def save_safetensors(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None, *, overwrite: bool = True
) -> Path:
    """safetensors ``save_file`` (tensors moved to CPU, made contiguous) written atomically."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return write_with(path, lambda tmp: save_file(clean, str(tmp), metadata=metadata), overwrite=overwrite)


def is_occupied(folder: Path) -> bool:
    """True when ``folder`` exists and is a file or a non-empty folder (an empty folder may be filled)."""
    if not folder.exists():
        return False
    return not folder.is_dir() or any(folder.iterdir())


def check_writable(folder: str | Path, what: str = "output") -> Path:
    """Create ``folder`` (and parents) and prove a file can be written there; a clear error otherwise."""
    folder = Path(folder)
    blocking = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise OutputError(f"cannot write {what} to {str(folder)!r}: {str(blocking)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"cannot write {what} to {str(folder)!r} ({exc.strerror or exc}); choose a writable location"
        ) from None
    return folder


def check_new_path(path: str | Path, what: str, *, overwrite: bool = False) -> Path:
    """``path`` can be created in a writable folder and does not hold an earlier result (unless ``overwrite``).

    Creates no file, only the missing parent folders (to probe that they can be written).
    """
    path = Path(path)
    if not overwrite and is_occupied(path):
        raise OutputError(f"{what} {str(path)!r} already exists; choose another path or pass --overwrite")
    check_writable(path.parent, what)
    return path


@contextlib.contextmanager
def atomic_folder(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``target``; on normal exit it replaces ``target`` in one rename.

    ``target`` may not exist, or be an empty folder; an occupied one is replaced only with ``overwrite`` (the old
    folder is moved aside first, then removed). On an exception or interrupt the temp folder is deleted and
    ``target`` is untouched.
    """
    target = Path(target)
    if not overwrite and is_occupied(target):
        raise OutputError(f"{str(target)!r} already exists and is not empty; choose another folder or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        _fsync_tree(tmp)
        _commit_folder(tmp, target, overwrite)
        _fsync(target.parent)  # the new name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit_folder(tmp: Path, target: Path, overwrite: bool) -> None:
    aside: Path | None = None
    if target.exists():
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        elif overwrite:
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, aside / "old")
        else:
            raise OutputError(f"{str(target)!r} appeared while writing; it was left alone (output discarded)")
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if aside is not None:  # put the old folder back
            os.replace(aside / "old", target)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputError(f"{str(target)!r} appeared while writing; it was left alone (output discarded)") from None
        raise
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


__all__ = [
    "atomic_folder",
    "check_new_path",
    "check_writable",
    "file_mode",
    "is_occupied",
    "save_safetensors",
    "write_bytes",
    "write_text",
    "write_with",
]
