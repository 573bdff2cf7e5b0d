"""`noisy --noise-std σ`: SVD of ΔW_avg + N(0, (σ·η)²) (paper Table 4).

σ is in units of η, the magnitude of every entry of ΔW_avg: σ = 1 adds noise as large as the signal.
"""

from dataclasses import dataclass

import torch

from ..errors import BadInputError
from ..options import option
from . import Init, InitOptions, OwnOptions, register, svd_factors


@dataclass(frozen=True, kw_only=True)
class NoisyOptions(OwnOptions):
    noise_std: float = option(type=float, required=True, help="σ of the noise, in units of η (e.g. 1).")

    def __post_init__(self):
        if not self.noise_std >= 0:
            raise BadInputError(f"--noise-std {self.noise_std} must be ≥ 0", hint="e.g. --noise-std 1 (in units of η)")


def factor(delta: torch.Tensor, rank: int, options: InitOptions):
    sigma = options.own.noise_std * options.eta
    noisy = delta.float() + torch.randn_like(delta, dtype=torch.float32) * sigma
    u, s, vh = svd_factors(noisy, rank, options)
    return u, torch.diag(s), vh, s


register(Init("noisy", "update", factor, summary="SVD of ΔW_avg plus Gaussian noise of σ·η", options=NoisyOptions))
