"""torch.distributed helpers shared by the multi-process apps (audits, DFT): set up from torchrun's
environment, broadcast a Python object from rank 0, barrier, gather / sum tensors across ranks. With one
process every helper is the identity."""
from __future__ import annotations

import os
from datetime import timedelta

import torch


def setup(timeout_s: float, backend: str | None = None):
    """(rank, world, local_rank, whether this call made the process group). Under torchrun (WORLD_SIZE > 1)
    a process group is made: ``backend``, by default NCCL on CUDA machines (each rank on cuda:LOCAL_RANK) and
    gloo otherwise."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    own = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        own = True
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return rank, world, local, own


def broadcast(obj, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def gather_cat(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's ``x`` (same shape on every rank) concatenated along dim 0 in rank order, on every rank."""
    if world == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def sum_(x: torch.Tensor, world: int) -> torch.Tensor:
    """The sum over ranks of ``x`` (in place), on every rank."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def teardown(own: bool) -> None:
    if own:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
