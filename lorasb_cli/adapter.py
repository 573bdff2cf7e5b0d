"""The LoRA-SB layer: a frozen linear layer plus s·B·R·A with B, A frozen and only R (r×r) trained.

The forward never materializes B·R·A: `base(x) + s·((x Aᵀ) Rᵀ) Bᵀ` (docs/design.md §4). B and A are kept in float32
as given (exactly the factors); R is a float32 parameter whatever the base dtype, so its small updates are not
rounded away in bf16/fp16, while the two large products run in the activations' dtype.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import artifacts, files, metadata
from .errors import BadInputError, IncompatibleArtifactError


class LoraSBLinear(nn.Module):
    """`base` [m, n] + s·B [m, r] · R [r, r] · A [r, n].

    With a `magnitude` [m] (a DoRA adapter, evaluation only) the weight is instead
    W = magnitude ⊙ (W0 + s·B·R·A) / ‖W0 + s·B·R·A‖ per output row, as PEFT's DoRA computes it.
    """

    def __init__(
        self,
        base: nn.Linear,
        lora_B: torch.Tensor,
        lora_R: torch.Tensor,
        lora_A: torch.Tensor,
        scale: float,
        magnitude: torch.Tensor | None = None,
    ):
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
            return F.linear(
                x, dora_weight(self.base.weight, self.delta_weight(), self.lora_magnitude).to(x.dtype), self.base.bias
            )
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
    factors: dict[str, artifacts.ModuleFactors],
    scale: float = 1.0,
    magnitudes: dict[str, torch.Tensor] | None = None,
) -> dict[str, LoraSBLinear]:
    """Wrap each module path of `factors` ({module: (B, R, A)}) in a LoraSBLinear; only the Rs stay trainable.
    `magnitudes` ({module: [m]}) makes those modules DoRA layers."""
    linear = {path: tuple(m.weight.shape) for path, m in model.named_modules() if isinstance(m, nn.Linear)}
    artifacts.check_fits(factors, linear, model="the model", path=None, hint=None)
    model.requires_grad_(False)
    wrapped = {}
    for path, (lora_B, lora_R, lora_A) in factors.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, child)
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


LOW_PRECISION = (torch.bfloat16, torch.float16)


def _float32_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: floating tensor inputs cast to float32 (the module's own dtype)."""

    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
            return value.float()
        return value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def train_in_float32(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """Make the parameters `names` of `model` trainable float32 master weights, whatever the base dtype.

    Every trained tensor is float32 (docs/design.md §5): in a bf16 model an AdamW step of lr·O(1) rounds away on most
    entries of a bf16 weight. So each module owning one of `names` (a classifier's head) gets its parameters upcast
    to float32 in place (the Parameter objects stay the same) and, when that changed its dtype, a forward pre-hook
    that casts floating inputs to float32: it takes the base's bf16/fp16 activations and returns float32 outputs
    (the head's logits). Returns {name: parameter} with requires_grad set.
    """
    params = dict(model.named_parameters())
    trained = {name: params[name] for name in names}
    for owner_path in dict.fromkeys(name.rpartition(".")[0] for name in trained):
        owner = model.get_submodule(owner_path) if owner_path else model
        upcast = False
        for param in owner.parameters(recurse=False):
            if param.dtype in LOW_PRECISION:
                param.data = param.data.float()
                upcast = True
        if upcast and not getattr(owner, "_lorasb_float32_inputs", False):
            owner.register_forward_pre_hook(_float32_inputs, with_kwargs=True)
            owner._lorasb_float32_inputs = True
    for param in trained.values():
        param.requires_grad_(True)
    return trained


def load_extra(model: nn.Module, tensors: dict[str, torch.Tensor], *, trainable: bool) -> None:
    """Copy full tensors (a classifier's head) into the model's parameters of the same names.

    `trainable`: they become float32 master weights first (`train_in_float32`: their modules take the
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
        train_in_float32(model, tensors)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
            params[name].requires_grad_(trainable)


ADAPTER_FILE = "adapter.safetensors"
MAGNITUDE = "lora_magnitude"  # `<module>.lora_magnitude` [m]: a DoRA adapter's magnitude vector
CONFIG_FILE = "adapter_config.json"


@dataclass
class Adapter(artifacts.FactorsFile):
    """A trained adapter directory: the factors, DoRA `magnitudes` {module: [m]}, `extra` full tensors (a trained
    head, or every tensor of a full fine-tune) and `meta` (adapter_config.json holds the same fields)."""

    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)


def save_adapter(run_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: metadata.AdapterMeta) -> Path:
    """Write `adapter.safetensors` (kind `adapter`) and `adapter_config.json` (its metadata) into `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    artifacts.write_artifact(run_dir / ADAPTER_FILE, tensors, meta)
    with files.atomic_path(run_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(artifacts.recorded_fields(meta), indent=2, sort_keys=True) + "\n")
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
    factors, extra = artifacts.read_factors(artifact)
    magnitudes = {m: extra.pop(f"{m}.{MAGNITUDE}").float() for m in factors if f"{m}.{MAGNITUDE}" in extra}
    if artifact.meta.method != "full":  # a full fine-tune's tensors are the base's own, checked on loading
        artifacts.check_extra(artifact.path, artifact.kind, extra, artifact.meta.head)
    return Adapter(path, artifact.meta, artifact.fields, factors, extra, magnitudes=magnitudes)
