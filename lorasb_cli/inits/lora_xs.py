"""`lora-xs`: SVD of the pretrained W0 (LoRA-XS, arXiv 2405.17604): B = U_r·S_r, A = V_rᵀ, R ~ N(0, 1e-5²).

As in LoRA-XS's reference code: the frozen factors carry W0's top-r singular subspaces (B is not orthonormal:
its columns are scaled by S_r), and the trained r×r matrix starts near zero, so the model starts as W0.
α = r, so s = α / r = 1.
"""

import torch

from . import InitOptions, svd_factors

R_STD = 1e-5


def factor(weight: torch.Tensor, rank: int, options: InitOptions):
    u, s, vh = svd_factors(weight, rank, options)
    return u * s, torch.randn(rank, rank) * R_STD, vh, s
