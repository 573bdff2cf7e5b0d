"""The linear algebra of the factors: truncated SVD of a module's update and the ranks it allows.

torch is imported where the SVD runs, so that the option declarations (lorasb_cli/configs.py) read DEFAULT_NITER
without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import BadInputError

if TYPE_CHECKING:
    import torch

# Sign matrices have flat spectra, where randomized SVD needs power iterations: measured on 4096² sign
# updates, niter=4 with oversampling r/2 (at least 16) stays within 0.3% of the optimal residual
# (benchmarks/results/decompose.md; worst case: random signs at r = 96).
DEFAULT_NITER = 4


def oversampling(rank: int) -> int:
    return max(16, rank // 2)


def truncated_svd(
    matrix: torch.Tensor, rank: int, *, niter: int = DEFAULT_NITER, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of `matrix` [m, n] in float32: U [m, r], S [r], Vh [r, n]."""
    import torch

    matrix = matrix.float()
    if exact:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q = min(rank + oversampling(rank), *matrix.shape)
    u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


def check_rank(rank: int, shapes: dict[str, tuple[int, ...]], path: str | None = None) -> None:
    """A rank must be positive and at most min(m, n) of every module."""
    if rank <= 0:
        raise BadInputError(f"--rank {rank} must be positive", hint="the paper uses 32, 64 or 96")
    for name, shape in shapes.items():
        if rank > min(shape):
            raise BadInputError(
                f"--rank {rank} exceeds min(m, n) = {min(shape)} of {name} {tuple(shape)}",
                path=path,
                hint=f"pass --rank {min(min(s) for s in shapes.values())} or less, or narrow --targets",
            )
