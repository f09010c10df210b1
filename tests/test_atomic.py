"""Atomic writes reach the disk before their name does: data fsynced before the rename, the folder after it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastedit.atomic import atomic_folder, write_text
from fastedit.errors import OutputError


class FsyncSpy(list):
    """Every fsync as (path, did ``target`` exist yet?); paths are told apart by a wrapped os.open."""

    target = Path("/nonexistent")


@pytest.fixture
def synced(monkeypatch) -> FsyncSpy:
    opened: dict[int, str] = {}
    calls = FsyncSpy()
    real_open, real_fsync = os.open, os.fsync

    def spy_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = os.fspath(path)
        return fd

    def spy_fsync(fd):
        calls.append((opened.get(fd, "?"), calls.target.exists()))
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "fsync", spy_fsync)
    return calls


def test_a_file_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, synced):
    target = tmp_path / "out" / "result.json"
    synced.target = target
    write_text(target, "{}")
    assert target.read_text() == "{}"
    data = [exists for path, exists in synced if Path(path).name.startswith(".result.json.")]
    folder = [exists for path, exists in synced if Path(path) == target.parent]
    assert data == [False], synced  # the temp file's data, before the target name existed
    assert folder and folder[-1] is True, synced  # the folder holding the new name, after


def test_a_folder_is_fsynced_file_by_file_before_its_rename(tmp_path, synced):
    target = tmp_path / "model"
    synced.target = target
    with atomic_folder(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"\0" * 64)
        (tmp / "config.json").write_text("{}")
    names = {Path(path).name: exists for path, exists in synced}
    assert names.get("weights.bin") is False and names.get("config.json") is False, synced
    assert names.get("sub") is False, synced
    parent = [exists for path, exists in synced if Path(path) == tmp_path]
    assert parent and parent[-1] is True, synced
    assert (target / "sub" / "weights.bin").read_bytes() == b"\0" * 64


def test_a_failed_folder_write_leaves_nothing_and_an_occupied_target_is_kept(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.mkdir()
    (target / "old.txt").write_text("earlier result")
    with pytest.raises(OutputError, match="already exists"), atomic_folder(target):
        pass
    assert (target / "old.txt").read_text() == "earlier result"
