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

from .. import adapter, artifacts, models
from ..registry import Registry, import_plugins


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
    factors: artifacts.Factors | None = None  # as artifacts.load_factors returns
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


def train_head(model: nn.Module) -> dict[str, nn.Parameter]:
    """A sequence classifier's head, made trainable float32 master weights (`train_in_float32`)."""
    return adapter.train_in_float32(model, models.head_parameters(model))


def tensors_of(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().cpu().contiguous() for name, p in params.items()}


import_plugins(__name__, __path__)
