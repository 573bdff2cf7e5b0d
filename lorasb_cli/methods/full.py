"""`full`: full fine-tuning of every parameter, and `head`: the classifier head only (a linear probe).

The adapter holds the trained tensors under their state_dict names; `merge --format hf` writes them in place
of the base's (a PEFT export has no LoRA form for them and refuses).
"""

from __future__ import annotations

import torch

from ..adapter import LOW_PRECISION
from ..errors import BadInputError
from ..models import head_parameters
from . import Prepared, Setup, tensors_of, train_head


def prepare_full(setup: Setup) -> Prepared:
    """Every parameter trained. A bf16/fp16 base is upcast to float32 master weights and trains under autocast in
    its own dtype (`Prepared.mixed_precision`: the Trainer's bf16/fp16), so steps are not rounded away."""
    model = setup.model
    base_dtype = next((p.dtype for p in model.parameters() if p.dtype in LOW_PRECISION), None)
    if base_dtype is not None:
        model.to(torch.float32)  # in place: the Parameter objects stay the same
    model.requires_grad_(True)
    params = dict(model.named_parameters())  # tied weights appear once
    return Prepared(model=model, export=lambda: tensors_of(params), config={"scale": 1.0}, mixed_precision=base_dtype)


def prepare_head(setup: Setup) -> Prepared:
    model = setup.model
    if not head_parameters(model):
        raise BadInputError("--method head trains a classifier's head", hint="train on --format classification data")
    model.requires_grad_(False)
    params = train_head(model)
    return Prepared(model=model, export=lambda: tensors_of(params), config={"scale": 1.0})
