"""`fastedit edit --workers N`: the same run in N local processes joined in one process group, for users who
never start torchrun themselves.

The parent checks everything it can without the model, then spawns N processes (a free local port, gloo on CPU,
nccl with one GPU per rank). Each runs the whole edit: v* requests and evaluation cases are split across them
(`fastedit.editing.values.compute_values` with ``across_ranks``), and rank 0 writes the outputs. Each worker runs
max(1, cores // N) torch threads unless $OMP_NUM_THREADS says otherwise. A `FasteditError` in a worker reaches
the parent as the same one-line error. A worker ends when its parent does: a parent killed by a signal runs no
clean-up, and its workers would otherwise go on computing (and holding the cores) for nobody.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from fastedit.errors import ConfigError, FasteditError
from fastedit.stats.distributed import barrier, free_port, init_local, is_distributed, shutdown

log = logging.getLogger(__name__)


class WorkerError(FasteditError):
    """A worker process failed; the message is the worker's own one-line error."""


def check_workers(workers: Any) -> int:
    """``workers`` as an int >= 1, and not inside a process group that torchrun already started."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be a whole number >= 1, got {workers!r}")
    if workers > 1 and (is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise ConfigError("--workers starts its own processes; under torchrun leave it out (torchrun sets the ranks)")
    return workers


def worker_threads(workers: int) -> int:
    """Torch threads per worker: the cores this process may use, shared out evenly (at least one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


@dataclass(frozen=True)
class _Setup:
    """What a spawned worker needs to look like its parent: logging levels and progress bars."""

    root_level: int
    fastedit_level: int
    progress: bool
    threads: int | None  # None: $OMP_NUM_THREADS decides


def run_in_workers(fn: Callable[[Any], Any], arg: Any, workers: int) -> None:
    """``fn(arg)`` in ``workers`` local processes joined in one process group; returns when all have finished.
    ``fn`` must be importable (a module-level function) and ``arg`` picklable."""
    from fastedit.progress import enabled

    setup = _Setup(
        root_level=logging.getLogger().getEffectiveLevel(),
        fastedit_level=logging.getLogger("fastedit").getEffectiveLevel(),
        progress=enabled(),
        threads=None if "OMP_NUM_THREADS" in os.environ else worker_threads(workers),
    )
    log.info(
        "starting %d worker processes (%s torch threads each)", workers, setup.threads or os.environ["OMP_NUM_THREADS"]
    )
    with tempfile.TemporaryDirectory(prefix="fastedit-workers-") as errors:
        try:
            mp.spawn(_worker, args=(workers, free_port(), fn, arg, setup, errors), nprocs=workers, join=True)
        except ProcessException as exc:
            messages = sorted(Path(errors).glob("rank*.txt"))
            if messages:
                raise WorkerError(messages[0].read_text(encoding="utf-8")) from None
            raise WorkerError(f"a worker process failed: {str(exc).strip().splitlines()[-1]}") from exc


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """End this process once ``parent`` is gone (the process is then re-parented, so its parent pid changes)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)  # nothing left to report to; skip clean-up that could block on the other ranks

    threading.Thread(target=watch, name="fastedit-parent-watch", daemon=True).start()


def _worker(rank: int, world: int, port: int, fn: Callable[[Any], Any], arg: Any, setup: _Setup, errors: str) -> None:
    from fastedit.progress import set_enabled

    _exit_with_parent(os.getppid())

    logging.basicConfig(level=setup.root_level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fastedit").setLevel(setup.fastedit_level)
    set_enabled(setup.progress)
    if setup.threads is not None:
        torch.set_num_threads(setup.threads)
    init_local(rank, world, port)
    try:
        fn(arg)
        barrier()  # every rank done before any leaves the group (see `shutdown`)
    except FasteditError as exc:  # the parent raises it as one line; the other ranks are stopped by spawn
        Path(errors, f"rank{rank}.txt").write_text(str(exc), encoding="utf-8")
        raise SystemExit(1) from None
    finally:
        shutdown()
