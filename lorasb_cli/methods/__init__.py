"""`lorasb train --method NAME`: what is trained, and how the result becomes an adapter.

Every method writes the same adapter (DESIGN.md §2): `<module>.lora_{B,R,A}` relative to the *original* W0,
so `merge` (hf and peft) and `evaluate` need not know the method. A method that changes W0 at initialization
(PiSSA, LoRA-GA, MiLoRA, IniLoRA: W_res = W0 − s·B0·A0) is exported as PEFT documents for PiSSA/LoRA-GA
conversion, a rank-2r LoRA: B' = [B, B0], R = diag(s·I, −s·I), A' = [A; A0]. DoRA adds a magnitude vector
(`<module>.lora_magnitude`); full fine-tuning stores the trained tensors under their state_dict names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import models
from ..registry import Registry


@dataclass
class Setup:
    """What a method gets: the loaded base `model` (a classifier's head already in place), its target
    `modules`, the `rank`, LoRA's `alpha` when the user set it, the checked factors (`lorasb` only), a
    `probe_loss(model)` on held-out samples, and `batches(n)`: training batches covering n samples."""

    model: nn.Module
    modules: list[str]
    rank: int
    alpha: float | None
    seed: int
    factors: tuple | None = None  # (artifacts.Artifact, {module: (B, R, A)}), as train.load_factors returns
    init_scale: float | str = 1.0
    init_samples: int = 32
    init_iters: int = 1000
    probe_loss: Callable[[nn.Module], float] | None = None
    batches: Callable[[int], Iterable[dict]] | None = None


@dataclass
class Prepared:
    """The module the Trainer trains, how to export it as adapter tensors, and the settings to record."""

    model: nn.Module
    export: Callable[[], dict[str, torch.Tensor]]
    config: dict = field(default_factory=dict)
    # Set when the parameters were upcast to float32 master weights (full fine-tuning of a bf16/fp16 base): train
    # under autocast in this dtype, as the Trainer's bf16/fp16 does.
    mixed_precision: torch.dtype | None = None
    # A method with its own optimizer (LoRA-Pro): builds it from the TrainingArguments (lr, betas, eps, weight
    # decay); the Trainer still makes the --scheduler around it. None: the Trainer's AdamW.
    optimizer: Callable[[object], torch.optim.Optimizer] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable[[Setup], Prepared]
    summary: str
    needs_factors: bool = False
    uses_rank: bool = True  # False: full fine-tuning and head-only train no low-rank matrices


METHODS: Registry[Method] = Registry("--method")


def register(method: Method) -> Method:
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    return METHODS.lookup(name)


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """A sequence classifier's head (trained with every method, as PEFT's `modules_to_save`)."""
    if not models.is_classifier(model):
        return {}
    return {n: p for n, p in model.named_parameters() if n.split(".")[0] in models.HEAD_MODULES}


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

    Every trained tensor is float32 (DESIGN.md §5): in a bf16 model an AdamW step of lr·O(1) rounds away on most
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


def train_head(model: nn.Module) -> dict[str, nn.Parameter]:
    """A sequence classifier's head, made trainable float32 master weights (`train_in_float32`)."""
    return train_in_float32(model, head_parameters(model))


def tensors_of(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().contiguous() for name, p in params.items()}


from . import full, inilora, lora_pro, lorasb, milora, peft_lora  # noqa: F401  (each registers itself)
