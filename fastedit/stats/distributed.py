"""torch.distributed support (gloo on CPU, nccl on GPU): the precompute splits batches across ranks and
all-reduces the sums; `fastedit edit` shares the v* requests among the ranks as they free up, splits the
evaluation, and gathers the results.

Ranks come from torchrun (its environment variables) or from `init_local` (``fastedit edit --workers N``
starting N local processes). Outside both (WORLD_SIZE unset or 1) every function here is a no-op and rank 0 of 1
is returned.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); initialises the default process group when torchrun asked for several ranks."""
    if not dist.is_available():
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():  # nccl: one GPU per local rank
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when a process group of more than one rank is running (no initialisation here)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def free_port() -> int:
    """A TCP port free on this machine now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_local(rank: int, world: int, port: int) -> None:
    """Join a group of ``world`` local processes on ``port``: the environment torchrun would set, then the same
    initialisation as under torchrun (`rank_and_world`: nccl with one GPU per rank when CUDA is there, else gloo)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    rank_and_world()


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """(rank, world size) for a block of work: a group torchrun's environment asks for is started here and left
    at the end; one that was already running (``--workers``, a caller's own) is kept."""
    started_here = dist.is_available() and not dist.is_initialized()
    rank, world = rank_and_world()
    try:
        yield rank, world
        if started_here:
            barrier()  # see `shutdown`: no rank leaves while another still talks to it
    finally:
        if started_here and world > 1:
            shutdown()


def shutdown() -> None:
    """Leave the process group (after the last collective).

    After a normal run, call `barrier` first: a gloo rank that tears its connections down while a peer is still
    finishing can take that peer down with it (SIGABRT, "terminate called without an active exception"). After an
    error there is no barrier, since a failed peer would never reach it."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Σ over ranks, in place (returns the tensor)."""
    if is_distributed():
        moved = tensor.to(_device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not tensor:
            tensor.copy_(moved.cpu())
    return tensor


def broadcast_rows(rows: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Rank 0's token rows on every rank (only rank 0 reads the corpus, so all ranks split the same plan).

    Rank 0 passes None when it failed to build them: every rank then returns None (and raises), none hangs.
    """
    if not is_distributed():
        return rows
    device = _device()
    rank = dist.get_rank()
    count = torch.tensor([-1 if rows is None else len(rows)], dtype=torch.long, device=device)
    dist.broadcast(count, src=0)
    if int(count) < 0:
        return None
    if rank == 0:
        assert rows is not None
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
        flat = torch.cat(rows).to(device) if rows else torch.zeros(0, dtype=torch.long, device=device)
    else:
        lengths = torch.zeros(int(count), dtype=torch.long, device=device)
    dist.broadcast(lengths, src=0)
    if rank != 0:
        flat = torch.zeros(int(lengths.sum()), dtype=torch.long, device=device)
    dist.broadcast(flat, src=0)
    return list(flat.cpu().split(lengths.cpu().tolist()))


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): rank's contiguous share of n items, the first n mod world ranks taking one more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + int(rank < extra)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors on the CPU), in rank order; [obj] outside a group."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_shares(n: int, compute: Callable[[int, int], Any]) -> list[Any]:
    """Each rank runs ``compute(lo, hi)`` on its contiguous share [lo, hi) of ``n`` items (`shard_bounds`);
    every rank receives the non-empty shares' results in rank order, i.e. in item order. Results must be
    picklable (tensors on the CPU). Outside a group: [compute(0, n)] (or [] when n is 0)."""
    rank, world = rank_and_world()
    lo, hi = shard_bounds(n, rank, world)
    local = compute(lo, hi) if hi > lo else None
    return [part for part in all_gather_objects(local) if part is not None]


class _TaskStore:
    """The process group's task counters: a TCP key-value store that rank 0 serves on a free port (the others
    learn it by broadcast), so a rank that finishes a task takes the next one with one atomic ``add``."""

    def __init__(self) -> None:
        self.group: Any = None
        self.store: Any = None
        self.calls = 0

    def counters(self) -> tuple[Any, str]:
        """The store of the current group (made on first use) and a fresh key prefix for one `share_tasks` call.
        Every rank makes the same calls in the same order (they are collective), so the prefixes agree."""
        if self.group is not dist.group.WORLD:
            host = os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = torch.zeros(1, dtype=torch.long)
            if dist.get_rank() == 0:
                store = dist.TCPStore(host, 0, dist.get_world_size(), is_master=True, wait_for_workers=False)
                port[0] = store.port
            broadcast_(port)
            if dist.get_rank() != 0:
                store = dist.TCPStore(host, int(port), dist.get_world_size(), is_master=False)
            self.group, self.store, self.calls = dist.group.WORLD, store, 0
        self.calls += 1
        return self.store, f"tasks{self.calls}/"


_TASKS = _TaskStore()


def share_tasks(
    sizes: Sequence[int],
    compute: Callable[[int], Any],
    progress: Callable[[int], None] | None = None,
    *,
    shared: bool = True,
) -> list[Any]:
    """``compute(i)`` for every task i, each run once by whichever rank is free first, tasks taken in index order;
    every rank receives all results in task order (picklable, tensors on the CPU).

    A static split leaves the ranks idle in turn when tasks take unequal time (v* requests converge after
    different numbers of steps), so ranks take tasks from a shared counter instead. Put the longest tasks first:
    the last ones taken then are short, and the ranks finish together. ``sizes`` (e.g. requests per task) only
    feed ``progress``, called after each task this rank finishes with the total size finished by all ranks.
    Outside a group, or with ``shared`` False: this process runs every task, in order."""
    if not (shared and is_distributed()):
        results, done = [], 0
        for i, size in enumerate(sizes):
            results.append(compute(i))
            done += size
            if progress is not None:
                progress(done)
        return results
    store, prefix = _TASKS.counters()
    mine: dict[int, Any] = {}
    while (i := int(store.add(prefix + "next", 1)) - 1) < len(sizes):
        mine[i] = compute(i)
        done = int(store.add(prefix + "done", int(sizes[i])))
        if progress is not None:
            progress(done)
    merged = {i: result for part in all_gather_objects(mine) for i, result in part.items()}
    return [merged[i] for i in range(len(sizes))]


def all_ranks_agree(flag: bool) -> bool:
    """True when ``flag`` is True on every rank (e.g. every rank found a cache entry)."""
    if not is_distributed():
        return flag
    return int(all_reduce_sum(torch.tensor([int(flag)], dtype=torch.long))[0]) == dist.get_world_size()


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s values written into ``tensor`` on every rank, in place (returns the tensor)."""
    if is_distributed():
        moved = tensor.detach().to(_device())
        dist.broadcast(moved, src=src)
        if moved is not tensor:
            with torch.no_grad():
                tensor.copy_(moved)
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()
