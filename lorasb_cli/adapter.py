"""The LoRA-SB layer: a frozen linear layer plus s·B·R·A with B, A frozen and only R (r×r) trained.

The forward never materializes B·R·A: `base(x) + s·((x Aᵀ) Rᵀ) Bᵀ` (DESIGN.md §4). B and A are kept in float32
as given (exactly the factors); R is a float32 parameter whatever the base dtype, so its small updates are not
rounded away in bf16/fp16, while the two large products run in the activations' dtype.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import artifacts
from .errors import BadInputError, IncompatibleArtifactError


class LoraSBLinear(nn.Module):
    """`base` [m, n] + s·B [m, r] · R [r, r] · A [r, n].

    With a `magnitude` [m] (a DoRA adapter, evaluation only) the weight is instead
    W = magnitude ⊙ (W0 + s·B·R·A) / ‖W0 + s·B·R·A‖ per output row, as PEFT's DoRA computes it.
    """

    def __init__(self, base: nn.Linear, lora_B: torch.Tensor, lora_R: torch.Tensor, lora_A: torch.Tensor, scale: float,
                 magnitude: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.register_buffer("lora_B", lora_B.detach().to(device=base.weight.device, dtype=torch.float32).clone())
        self.register_buffer("lora_A", lora_A.detach().to(device=base.weight.device, dtype=torch.float32).clone())
        self.lora_R = nn.Parameter(lora_R.detach().to(device=base.weight.device, dtype=torch.float32).clone())
        self.scale = scale
        if magnitude is not None:
            magnitude = magnitude.detach().to(device=base.weight.device, dtype=torch.float32).clone()
        self.register_buffer("lora_magnitude", magnitude)

    @property
    def rank(self) -> int:
        return self.lora_R.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_magnitude is not None:
            return F.linear(x, dora_weight(self.base.weight, self.delta_weight(), self.lora_magnitude).to(x.dtype),
                            self.base.bias)  # fmt: skip
        result = self.base(x)
        xa = F.linear(x, self.lora_A.to(x.dtype))  # [..., r]
        xar = F.linear(xa.float(), self.lora_R)  # float32: the trained part
        return result + self.scale * F.linear(xar.to(x.dtype), self.lora_B.to(x.dtype))

    def delta_weight(self) -> torch.Tensor:
        """s·B·R·A [m, n] in float32 (for merging and tests only)."""
        return self.scale * (self.lora_B @ self.lora_R.detach() @ self.lora_A)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's W [m, n] in float32: magnitude [m] ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ over each output row."""
    combined = weight.float() + delta.float()
    return combined * (magnitude.float() / combined.norm(dim=1))[:, None]


def inject(
    model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    scale: float = 1.0,
    magnitudes: dict[str, torch.Tensor] | None = None,
) -> dict[str, LoraSBLinear]:
    """Wrap each module path of `factors` ({module: (B, R, A)}) in a LoraSBLinear; only the Rs stay trainable.
    `magnitudes` ({module: [m]}) makes those modules DoRA layers."""
    model.requires_grad_(False)
    wrapped = {}
    for path, (lora_B, lora_R, lora_A) in factors.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, child, None)
        if not isinstance(base, nn.Linear):
            raise IncompatibleArtifactError(f"module '{path}' is not a linear layer of the model")
        if (lora_B.shape[0], lora_A.shape[1]) != tuple(base.weight.shape):
            raise IncompatibleArtifactError(
                f"factors of '{path}' are for a {lora_B.shape[0]}×{lora_A.shape[1]} weight, the model's is "
                f"{base.weight.shape[0]}×{base.weight.shape[1]}"
            )
        layer = LoraSBLinear(base, lora_B, lora_R, lora_A, scale, (magnitudes or {}).get(path))
        setattr(parent, child, layer)
        wrapped[path] = layer
    return wrapped


def remove(model: nn.Module) -> None:
    """Put every wrapped base linear layer back (unmerged)."""
    for path, module in list(model.named_modules()):
        if isinstance(module, LoraSBLinear):
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, module.base)


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter holds, float32 on CPU: `<module>.lora_B`, `.lora_R`, `.lora_A` of every LoraSBLinear,
    and every other trainable parameter (a classifier's head) under its state_dict name."""
    tensors = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraSBLinear):
            for name in ("lora_B", "lora_R", "lora_A"):
                tensors[f"{path}.{name}"] = getattr(module, name).detach().float().cpu().contiguous()
    for name, param in model.named_parameters():
        if param.requires_grad and not name.endswith(".lora_R"):
            tensors[name] = param.detach().float().cpu().contiguous()
    return tensors


def load_extra(model: nn.Module, tensors: dict[str, torch.Tensor], *, trainable: bool) -> None:
    """Copy full tensors (a classifier's head) into the model's parameters of the same names.

    `trainable`: they become float32 master weights first (`methods.train_in_float32`: their modules take the
    base's bf16/fp16 activations), so the copy is exact and training steps are not rounded away. Otherwise
    (evaluation) they keep the base dtype."""
    params = dict(model.named_parameters())
    unknown = [name for name in tensors if name not in params]
    if unknown:
        raise IncompatibleArtifactError(f"the model has no parameters {', '.join(unknown[:3])}")
    for name, tensor in tensors.items():
        if params[name].shape != tensor.shape:
            raise IncompatibleArtifactError(
                f"'{name}' is {tuple(tensor.shape)}, the model's is {tuple(params[name].shape)}"
            )
    if trainable:
        from .methods import train_in_float32  # methods build on this module

        train_in_float32(model, tensors)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
            params[name].requires_grad_(trainable)


ADAPTER_FILE = "adapter.safetensors"
MAGNITUDE = "lora_magnitude"  # `<module>.lora_magnitude` [m]: a DoRA adapter's magnitude vector
CONFIG_FILE = "adapter_config.json"


@dataclass
class Adapter:
    """A trained adapter directory: `factors` {module: (B, R, A)}, DoRA `magnitudes` {module: [m]}, `extra`
    full tensors (a trained head, or every tensor of a full fine-tune, under the base state_dict names) and
    `config` (adapter_config.json, the same dict as the provenance)."""

    path: Path
    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    extra: dict[str, torch.Tensor]
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return float(self.config.get("scale", 1.0))


def save_adapter(run_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write `adapter.safetensors` (provenance kind `adapter`) and `adapter_config.json` into `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = artifacts.provenance("adapter", **config)
    artifacts.write_artifact(run_dir / ADAPTER_FILE, tensors, meta)
    with artifacts.atomic_path(run_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return run_dir


def load_adapter(run_dir: str | os.PathLike) -> Adapter:
    """Read an adapter directory written by `lorasb train` (or a factors file used as an untrained adapter)."""
    path = Path(run_dir)
    file = path / ADAPTER_FILE if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise BadInputError(
            f"adapter directory lacks {ADAPTER_FILE}", path=str(path), hint="pass the -o directory of lorasb train"
        )
    artifact = artifacts.Artifact(file, kinds=("adapter", "factors"))
    modules = artifacts.factor_modules(artifact)
    # Copies owned in memory: a tensor read from safetensors is a view that pins a mapping of the whole file.
    tensors = {name: tensor.clone() for name, tensor in artifact.items()}
    factors = {m: tuple(tensors[f"{m}.{s}"].float() for s in artifacts.FACTOR_SUFFIXES) for m in modules}
    factor_names = {f"{m}.{s}" for m in modules for s in artifacts.FACTOR_SUFFIXES}
    magnitudes = {m: tensors[f"{m}.{MAGNITUDE}"].float() for m in modules if f"{m}.{MAGNITUDE}" in tensors}
    factor_names |= {f"{m}.{MAGNITUDE}" for m in magnitudes}
    extra = {name: tensor for name, tensor in tensors.items() if name not in factor_names}
    return Adapter(path=path, config=artifact.meta, factors=factors, extra=extra, magnitudes=magnitudes)
