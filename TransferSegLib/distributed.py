"""Multi-process training under ``torchrun``: the same commands, one process per GPU (or CPU).

``torchrun --nproc_per_node=N`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; when they say
more than one process, :func:`init` joins the process group (NCCL on GPUs, gloo on CPU) and
:func:`wrap` puts the model in DistributedDataParallel. Every rank draws its own patches; only
rank 0 validates, writes files and reports events, and its decisions are broadcast.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group if started by torchrun with more than one process."""
    if is_distributed() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def device(default: torch.device) -> torch.device:
    """Each rank's device: its own GPU (``LOCAL_RANK``) under torchrun, else ``default``."""
    if dist.is_initialized() and default.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return default


def wrap(model: torch.nn.Module, device: torch.device,
         find_unused: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when distributed; itself otherwise.

    ``find_unused``: some parameters get no gradient in a step (the other datasets' heads of a
    multi-head network); DDP must then look for them instead of waiting.
    """
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_comm_device(device))
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (a cancel seen by one stops all)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], dtype=torch.int64, device=_comm_device(device))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")
