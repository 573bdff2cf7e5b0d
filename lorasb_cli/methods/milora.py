"""`milora`: LoRA on the *minor* singular components of W0 (MiLoRA, arXiv 2406.09044), α = r.

B0 = U_min·√S_min, A0 = √S_min·V_minᵀ over the r smallest singular values; W0 − B0·A0 stays frozen.
PEFT has no MiLoRA, so this is PEFT's LoRA layer with the minor components put in (PiSSA's recipe, other end).
"""

from __future__ import annotations

import torch

from . import Setup
from .peft_lora import prepare_peft


def minor_components(module: str, weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0 [m, r], A0 [r, n]) with B0·A0 the rank-r approximation of W0 from its r smallest singular values."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = s[-rank:].sqrt()
    return u[:, -rank:] * root, root[:, None] * vh[-rank:]


def prepare(setup: Setup):
    return prepare_peft(setup, alpha=setup.options.alpha_or(setup.rank), custom_init=minor_components)
