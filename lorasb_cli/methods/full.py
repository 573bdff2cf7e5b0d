"""`full`: full fine-tuning of every parameter, and `head`: the classifier head only (a linear probe).

The adapter holds the trained tensors under their state_dict names; `merge --format hf` writes them in place
of the base's (a PEFT export has no LoRA form for them and refuses).
"""

from __future__ import annotations

from ..errors import BadInputError
from . import Method, Prepared, Setup, head_parameters, register, tensors_of


def prepare_full(setup: Setup) -> Prepared:
    model = setup.model
    model.requires_grad_(True)
    params = dict(model.named_parameters())  # tied weights appear once
    return Prepared(model=model, export=lambda: tensors_of(params), config={"scale": 1.0})


def prepare_head(setup: Setup) -> Prepared:
    model = setup.model
    params = head_parameters(model)
    if not params:
        raise BadInputError("--method head trains a classifier's head", hint="train on --format classification data")
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return Prepared(model=model, export=lambda: tensors_of(params), config={"scale": 1.0})


register(Method("full", prepare_full, "full fine-tuning of every parameter", uses_rank=False))
register(Method("head", prepare_head, "the classifier head only (sequence classification)", uses_rank=False))
