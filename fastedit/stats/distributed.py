"""torchrun support: split batches across ranks and all-reduce the sums (gloo on CPU, nccl on GPU).

Outside torchrun (WORLD_SIZE unset or 1) every function here is a no-op and rank 0 of 1 is returned.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); initialises the default process group when torchrun asked for several ranks."""
    if not dist.is_available():
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Σ over ranks, in place (returns the tensor)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        moved = tensor.to(_device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        if moved is not tensor:
            tensor.copy_(moved.cpu())
    return tensor


def broadcast_rows(rows: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Rank 0's token rows on every rank (only rank 0 reads the corpus, so all ranks split the same plan).

    Rank 0 passes None when it failed to build them: every rank then returns None (and raises), none hangs.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
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


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
