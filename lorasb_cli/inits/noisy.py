"""`noisy --noise-std σ`: SVD of ΔW_avg + N(0, (σ·η)²) (paper Table 4).

σ is in units of η, the magnitude of every entry of ΔW_avg: σ = 1 adds noise as large as the signal.
"""

import torch

from ..errors import BadInputError
from . import Init, InitOptions, register, svd_factors


def factor(delta: torch.Tensor, rank: int, options: InitOptions):
    if options.noise_std is None or options.noise_std < 0:
        raise BadInputError("--init noisy needs --noise-std σ ≥ 0", hint="e.g. --noise-std 1 (in units of η)")
    noisy = delta.float() + torch.randn_like(delta, dtype=torch.float32) * (options.noise_std * options.eta)
    u, s, vh = svd_factors(noisy, rank, options)
    return u, torch.diag(s), vh, s


register(Init("noisy", "update", factor, summary="SVD of ΔW_avg plus Gaussian noise of σ·η"))
