"""`lorasb decompose --init NAME`: how B [m, r], R [r, r], A [r, n] are made from one matrix per target module.

Each init lives in its own module and registers an `Init`. `source` says what the matrix is: ΔW_avg from an
update (`update`) or the pretrained weight W0 (`model`). Every init sees one module's matrix at a time, so
decompose streams module by module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..registry import Registry, import_plugins

# B [m, r], R [r, r], A [r, n], and the top-r singular values S [r] of the matrix that was factored.
Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class InitOptions:
    """What an init may use besides the matrix: the SVD settings, η of the update, and the noise level."""

    niter: int = 4
    exact: bool = False
    eta: float | None = None
    noise_std: float | None = None  # noisy: σ in units of η, the size of every entry of ΔW_avg


@dataclass(frozen=True)
class Init:
    name: str
    source: str  # "update" (ΔW_avg) or "model" (W0)
    factor: Callable[[torch.Tensor, int, InitOptions], Factors]
    scale: float = 1.0  # s of W = W0 + s·B·R·A
    summary: str = ""


INITS: Registry[Init] = Registry("--init")


def register(init: Init) -> Init:
    return INITS.register(init.name, init)


def get_init(name: str) -> Init:
    return INITS.lookup(name)


def svd_factors(
    matrix: torch.Tensor, rank: int, options: InitOptions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r [m, r], S_r [r], V_rᵀ [r, n] of `matrix` (randomized unless `options.exact`)."""
    from ..linalg import truncated_svd

    return truncated_svd(matrix, rank, niter=options.niter, exact=options.exact)


import_plugins(__name__, __path__)
