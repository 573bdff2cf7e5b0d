"""`--strategy fsdp` (DESIGN.md §5): the frozen base sharded across a launcher's processes with FSDP2.

Each decoder layer (the model's `_no_split_modules`) is one `fully_shard` unit and the root holds the rest
(embeddings, final norm, head), over a 1-D device mesh of every process (cpu/gloo or cuda/nccl). A unit's weights
are whole only while its forward or backward runs. Trained tensors are left whole on every rank (`keep_whole`),
as under DDP: they are r×r cores, LoRA factors or a head, a sliver of the base, so sharding them would save
nothing, while whole they keep their dtype (float32 beside a bf16 base, no MixedPrecisionPolicy needed to mix the
two in one unit) and a checkpoint's tensors and optimizer state are the same under either strategy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .errors import BadInputError


def sharding(strategy: str) -> bool:
    """Whether `--strategy` shards this process's model: fsdp with more than one process in the group."""
    return strategy == "fsdp" and dist.is_initialized() and dist.get_world_size() > 1


def shard_base(model: nn.Module, device: torch.device, keep_whole: Iterable[nn.Parameter] = ()) -> None:
    """Shard `model`'s parameters across the process group, in place, except `keep_whole` (left as they are on
    every rank: FSDP2 neither gathers nor reduces them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    # Children before their parents: an inner unit must exist before the one around it.
    units = [m for m in reversed(list(model.modules())) if type(m).__name__ in layer_classes]
    if not units:
        raise BadInputError(
            f"--strategy fsdp shards a model per decoder layer; {type(model).__name__} names none",
            hint="use --strategy ddp",
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = set(keep_whole)
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())
