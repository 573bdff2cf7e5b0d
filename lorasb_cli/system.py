"""Process-level facts: peak memory and the torch.distributed group a launcher may have set up."""

from __future__ import annotations

import os
import resource

import torch
import torch.distributed as dist


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated on `device`, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def init_distributed() -> tuple[int, int]:
    """Join the process group a launcher (torchrun) describes in the environment; returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the process group in place (a no-op outside one). NCCL needs device tensors."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        on_device = tensor.cuda()
        dist.all_reduce(on_device)
        tensor.copy_(on_device.cpu())
    else:
        dist.all_reduce(tensor)
    return tensor
