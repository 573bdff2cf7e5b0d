"""`noisy --noise-std σ`: SVD of ΔW_avg + N(0, (σ·η)²) (paper Table 4).

σ is in units of η, the magnitude of every entry of ΔW_avg: σ = 1 adds noise as large as the signal.
"""

import torch

from . import Init, InitOptions, register, svd_factors


def factor(delta: torch.Tensor, rank: int, options: InitOptions):
    noisy = delta.float() + torch.randn_like(delta, dtype=torch.float32) * (options.noise_std * options.eta)
    u, s, vh = svd_factors(noisy, rank, options)
    return u, torch.diag(s), vh, s


register(Init("noisy", "update", factor, summary="SVD of ΔW_avg plus Gaussian noise of σ·η"))
