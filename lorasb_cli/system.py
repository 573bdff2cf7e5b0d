"""Process-level facts: peak memory, the global rank a launcher gives this process, and its torch.distributed group."""

from __future__ import annotations

import logging
import os
import resource

import torch
import torch.distributed as dist

from .errors import BadInputError

log = logging.getLogger("lorasb")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated on `device`, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory_label(device: torch.device) -> str:
    """What `peak_memory_bytes(device)` measures, as a summary names it."""
    if device.type == "cuda":
        return "measured peak (allocated by torch on the GPU)"
    return "measured peak (process RSS)"


def launcher_rank() -> tuple[int, int]:
    """(global rank, world size) of this process as a launcher describes it: torchrun and `accelerate launch` both
    set RANK and WORLD_SIZE; (0, 1) without a launcher. Readable before any process group exists."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process is global rank 0: the one process of a job that writes files and prints to stdout."""
    return launcher_rank()[0] == 0


def launcher_strategy(strategy: str) -> str:
    """The --strategy of this process: `strategy`, or fsdp where `accelerate launch --use_fsdp --fsdp_version 2`
    asks for FSDP2 (its ACCELERATE_USE_FSDP and FSDP_VERSION variables). Called before any weight loads.

    lorasb applies FSDP2 itself (lorasb_cli/fsdp.py: fully_shard per decoder layer, trained tensors whole), so the
    variable is cleared for the Trainer's Accelerator, whose FSDP plugin would wrap the model again (and applies only
    to GPU-class process groups). accelerate's other FSDP settings are not read. FSDP1 and DeepSpeed are refused
    (docs/design.md §5: only tested launchers).
    """
    if _set("ACCELERATE_USE_DEEPSPEED"):
        raise BadInputError(
            "lorasb does not support DeepSpeed (ACCELERATE_USE_DEEPSPEED is set)",
            hint="launch with accelerate launch --use_fsdp --fsdp_version 2, or torchrun ... --strategy fsdp",
        )
    if not _set("ACCELERATE_USE_FSDP"):
        return strategy
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise BadInputError(
            f"lorasb shards with FSDP2; accelerate launch asks for FSDP version {version}",
            hint="pass --fsdp_version 2 to accelerate launch, or use torchrun ... --strategy fsdp",
        )
    del os.environ["ACCELERATE_USE_FSDP"]
    log.info("accelerate launch --use_fsdp --fsdp_version 2: --strategy fsdp (lorasb shards per decoder layer)")
    return "fsdp"


def _set(variable: str) -> bool:
    return os.environ.get(variable, "false").lower() in ("true", "1")


def init_distributed() -> tuple[int, int]:
    """Join the process group a launcher (torchrun) describes in the environment; returns (rank, world)."""
    world = launcher_rank()[1]
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def leave_distributed() -> None:
    """Leave the process group a data-parallel command joined, all ranks together, once its work is done.

    Left to the interpreter's exit, gloo's and NCCL's threads are torn down in no set order, and a rank can abort
    with "terminate called without an active exception" after a run that succeeded."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the process group in place (a no-op outside one). NCCL needs device tensors."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    moved = _on_backend(tensor)
    dist.all_reduce(moved)
    return tensor.copy_(moved) if moved is not tensor else tensor


def _on_backend(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` where the process group's backend can send it: NCCL needs device tensors."""
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        return tensor.cuda()
    return tensor


def reduce_to(tensor: torch.Tensor, owner: int) -> torch.Tensor:
    """Sum `tensor` over the process group into rank `owner`'s copy (in place there; other ranks' copies are left
    undefined). Returns the tensor holding the sum on `owner`."""
    moved = _on_backend(tensor)
    dist.reduce(moved, dst=owner)
    return tensor.copy_(moved) if moved is not tensor else tensor


def to_main(tensor: torch.Tensor | None, owner: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Rank `owner`'s `tensor` ([shape] of `dtype`, on the CPU) on global rank 0; None on every other rank."""
    rank = dist.get_rank()
    if owner == 0:
        return tensor if rank == 0 else None
    if rank == owner:
        dist.send(_on_backend(tensor), dst=0)
        return None
    if rank != 0:
        return None
    received = _on_backend(torch.empty(shape, dtype=dtype))
    dist.recv(received, src=owner)
    return received.cpu()


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of `tensor` over the process group, in place (a no-op outside one)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    moved = _on_backend(tensor)
    dist.all_reduce(moved, op=dist.ReduceOp.MAX)
    return tensor.copy_(moved) if moved is not tensor else tensor


def barrier() -> None:
    """Wait for every process of the group (a no-op outside one): rank 0's files are written before others read."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_main(value):
    """Rank 0's `value` on every process of the group (`value` itself outside one): one decision for the job."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
