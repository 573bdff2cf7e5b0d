"""`noisy --noise-std σ`: SVD of ΔW_avg + N(0, (σ·η)²) (paper Table 4).

σ is in units of η, the magnitude of every entry of ΔW_avg: σ = 1 adds noise as large as the signal.
"""

import torch

from . import InitOptions, svd_factors


def factor(delta: torch.Tensor, rank: int, options: InitOptions):
    sigma = options.own.noise_std * options.eta
    noisy = delta.float() + torch.randn_like(delta, dtype=torch.float32) * sigma
    u, s, vh = svd_factors(noisy, rank, options)
    return u, torch.diag(s), vh, s
