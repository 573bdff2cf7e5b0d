"""The LoRA-SB layer: a frozen linear layer plus s·B·R·A with B, A frozen and only R (r×r) trained.

The forward never materializes B·R·A: `base(x) + s·((x Aᵀ) Rᵀ) Bᵀ` (docs/design.md §4). B and A are kept in float32
as given (exactly the factors); R is a float32 parameter whatever the base dtype, so its small updates are not
rounded away in bf16/fp16, while the two large products run in the activations' dtype.

A method whose adapter changes what the layer computes (DoRA) brings its `LayerVariant` (lorasb_cli/methods,
`Method.variant`), as PEFT's LoRA layer takes a `LoraVariant`: this module, merge and inspect call the variant
and never name the method.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import artifacts, files, metadata, models, quantization
from .errors import BadInputError, IncompatibleArtifactError


class LayerVariant:
    """What an adapted layer computes from W0 [m, n] and its factors: here W0 + s·B·R·A, the plain low-rank
    update. A method that changes the layer subclasses it beside its implementation and names it in its
    declaration (`Method.variant`); the variant brings the per-module tensors it reads (`module_tensors`, stored
    as `<module>.<name>` in the adapter), its forward, its merged weight, and its PEFT export."""

    module_tensors: tuple[str, ...] = ()  # names of the per-module tensors beside B, R, A
    peft_config: ClassVar[dict] = {"use_dora": False}  # what PEFT's adapter_config.json says of the layer
    serving_hint: str | None = None  # what a server must know to serve the PEFT export, if anything

    def forward(self, layer: LoraSBLinear, x: torch.Tensor) -> torch.Tensor:
        """`base(x) + s·((x Aᵀ) Rᵀ) Bᵀ`, B·R·A never materialized; R's product in float32."""
        result = layer.base(x)
        xa = F.linear(x, layer.lora_A.to(x.dtype))  # [..., r]
        xar = F.linear(xa.float(), layer.lora_R)  # float32: the trained part
        return result + layer.scale * F.linear(xar.to(x.dtype), layer.lora_B.to(x.dtype))

    def merged_weight(
        self,
        weight: torch.Tensor,
        lora_B: torch.Tensor,
        lora_R: torch.Tensor,
        lora_A: torch.Tensor,
        scale: float,
        tensors: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The layer's weight [m, n] in float32: W [m, n] + s·B [m, r]·R [r, r]·A [r, n]; `tensors`: the module's
        `module_tensors` by name."""
        # (B·R)·A: the m×n product is formed once, inside addmm, with no separate delta matrix.
        return torch.addmm(weight.float(), lora_B.float() @ lora_R.float(), lora_A.float(), alpha=scale)

    def peft_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module's `module_tensors` as a PEFT adapter stores them, by their name after
        `base_model.model.<module>.`."""
        return {}


PLAIN = LayerVariant()


class LoraSBLinear(nn.Module):
    """`base` [m, n] + s·B [m, r] · R [r, r] · A [r, n], computed as its `variant` says (default: PLAIN), which
    reads the module's `tensors` ({name: tensor}, held as float32 buffers, evaluation only)."""

    def __init__(
        self,
        base: nn.Linear,
        lora_B: torch.Tensor,
        lora_R: torch.Tensor,
        lora_A: torch.Tensor,
        scale: float,
        variant: LayerVariant = PLAIN,
        tensors: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.register_buffer("lora_B", lora_B.detach().to(device=base.weight.device, dtype=torch.float32).clone())
        self.register_buffer("lora_A", lora_A.detach().to(device=base.weight.device, dtype=torch.float32).clone())
        self.lora_R = nn.Parameter(lora_R.detach().to(device=base.weight.device, dtype=torch.float32).clone())
        self.scale = scale
        self.variant = variant
        tensors = tensors or {}
        missing = [name for name in variant.module_tensors if name not in tensors]
        if missing:
            raise IncompatibleArtifactError(
                f"the adapter lacks its layers' tensors {', '.join(missing)}", hint=_REWRITE_HINT
            )
        for name in variant.module_tensors:
            tensor = tensors[name].detach().to(device=base.weight.device, dtype=torch.float32).clone()
            self.register_buffer(name, tensor)

    @property
    def rank(self) -> int:
        return self.lora_R.shape[0]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The variant's per-module tensors, by name."""
        return {name: getattr(self, name) for name in self.variant.module_tensors}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.variant.forward(self, x)

    def delta_weight(self) -> torch.Tensor:
        """s·B·R·A [m, n] in float32, materialized (a reference for tests: the forward never forms it)."""
        return self.scale * (self.lora_B @ self.lora_R.detach() @ self.lora_A)


# What an adapter whose tensors do not match its recorded method is told.
_REWRITE_HINT = "the adapter was edited or written by another lorasb: train it again with this one"


def inject(
    model: nn.Module,
    factors: dict[str, artifacts.ModuleFactors],
    scale: float = 1.0,
    variant: LayerVariant = PLAIN,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, LoraSBLinear]:
    """Wrap each module path of `factors` ({module: (B, R, A)}) in a LoraSBLinear of `variant`, with its
    per-module `tensors` ({module: {name: tensor}}); only the Rs stay trainable."""
    named = dict(model.named_modules())
    linear = {path: models.linear_shape(m) for path, m in named.items() if isinstance(m, nn.Linear)}
    artifacts.check_fits(factors, linear, model="the model", path=None, hint=None)
    unread = {name for own in (tensors or {}).values() for name in own} - set(variant.module_tensors)
    if unread:  # e.g. a magnitude the recorded method's layer would ignore
        raise IncompatibleArtifactError(
            f"the adapter's layers hold tensors its recorded method does not read: {', '.join(sorted(unread))}",
            hint=_REWRITE_HINT,
        )
    if any(quantization.is_quantized(named[path]) for path in tensors or {}):
        raise BadInputError(  # e.g. DoRA's magnitudes rescale the dense W0 + B·R·A
            "this adapter's layers read the base's dense weights, which --quantize packs", hint="drop --quantize"
        )
    model.requires_grad_(False)
    wrapped = {}
    for path, (lora_B, lora_R, lora_A) in factors.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, child)
        layer = LoraSBLinear(base, lora_B, lora_R, lora_A, scale, variant, (tensors or {}).get(path))
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
CONFIG_FILE = "adapter_config.json"


@dataclass
class Adapter(artifacts.FactorsFile):
    """A trained adapter directory: the factors, `module_tensors` {module: {name: tensor}} (what a method's layer
    variant reads beside B, R, A, e.g. DoRA's magnitude), `extra` full tensors (a trained head, or every tensor of
    a full fine-tune) and `meta` (adapter_config.json holds the same fields)."""

    module_tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


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
    module_tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in [n for n in extra if is_module_tensor(n, factors)]:
        module, _, own = name.rpartition(".")
        module_tensors.setdefault(module, {})[own] = extra.pop(name).float()
    if artifact.meta.method != "full":  # a full fine-tune's tensors are the base's own, checked on loading
        artifacts.check_extra(artifact.path, artifact.kind, extra, artifact.meta.head)
    return Adapter(path, artifact.meta, artifact.fields, factors, extra, module_tensors=module_tensors)


def is_module_tensor(name: str, modules) -> bool:
    """Whether tensor `name` of an adapter is a layer variant's per-module tensor: `<module>.lora_<name>` of an
    adapted module that is none of its B, R, A (a head's tensors are `<module>.weight`, `.bias`)."""
    module, _, own = name.rpartition(".")
    return module in modules and own.startswith("lora_") and own not in artifacts.FACTOR_SUFFIXES
