"""`lorasb` (default): B = U_r, R = diag(S_r), A = V_rᵀ of ΔW_avg — orthonormal B and A (paper §3)."""

import torch

from . import InitOptions, svd_factors


def factor(delta: torch.Tensor, rank: int, options: InitOptions):
    u, s, vh = svd_factors(delta, rank, options)
    return u, torch.diag(s), vh, s
