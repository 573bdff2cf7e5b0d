"""`non-orthonormal`: B = U_r·S_r, R = I, A = V_rᵀ of ΔW_avg (paper Appendix E).

The same starting product B·R·A as `lorasb`, but BᵀB = S_r² ≠ I: the R-gradient Bᵀ·G·Aᵀ is no longer the
optimal low-rank approximation of the full gradient, which is what the ablation measures.
"""

import torch

from . import InitOptions, svd_factors


def factor(delta: torch.Tensor, rank: int, options: InitOptions):
    u, s, vh = svd_factors(delta, rank, options)
    return u * s, torch.eye(rank), vh, s
