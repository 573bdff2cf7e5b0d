"""`lorasb decompose`: truncated SVD of each module's update ΔW_avg ≈ U S Vᵀ into B = U_r, R = diag(S_r), A = V_rᵀ.

B and A are orthonormal; η scales R only. The randomized SVD must stay within 1% of the
Eckart–Young optimum ‖ΔW − trunc_r(ΔW)‖_F (DESIGN.md §4); `exact` runs the full SVD.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import artifacts, models
from .errors import BadInputError
from .estimate import load_update

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
    matrix = matrix.float()
    if exact:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    q = min(rank + oversampling(rank), *matrix.shape)
    u, s, v = torch.svd_lowrank(matrix, q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


@dataclass
class DecomposeSummary:
    path: Path
    rank: int
    energy: dict[str, float] = field(default_factory=dict)

    def energy_by_kind(self) -> list[tuple[str, int, float, float, float]]:
        """(module kind with layer numbers as *, count, mean, min, max) of the captured energy."""
        groups: dict[str, list[float]] = {}
        for module, value in self.energy.items():
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", module), []).append(value)
        return [(k, len(v), sum(v) / len(v), min(v), max(v)) for k, v in groups.items()]


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


def decompose(
    update_path: str,
    rank: int,
    out: str,
    *,
    niter: int = DEFAULT_NITER,
    exact: bool = False,
    seed: int = 0,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> DecomposeSummary:
    """Factor every module of the update at `update_path` and write `<module>.lora_{B,R,A}` to `out`."""
    update = artifacts.Artifact(update_path, kinds=("update",))
    head = update.meta.get("head", [])  # a classifier's head: carried over as is, not factored
    weights = [name for name in update.names if name not in head]
    shapes = {name.removesuffix(".weight"): shape for name, shape in update.shapes().items() if name not in head}
    check_rank(rank, shapes, update.path)
    if niter < 0:
        raise BadInputError(f"--niter {niter} must be ≥ 0")
    target_device = models.resolve_device(device)

    factors: dict[str, torch.Tensor] = {}
    energy: dict[str, float] = {}
    # svd_lowrank draws from the global generator: fork it so the same seed gives the same factors.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for done, name in enumerate(weights, start=1):
            module = name.removesuffix(".weight")
            delta = load_update(update, name).to(target_device)
            u, s, vh = truncated_svd(delta, rank, niter=niter, exact=exact)
            energy[module] = float((s.square().sum() / delta.square().sum()).clamp(max=1.0)) if s.numel() else 0.0
            factors[f"{module}.lora_B"] = u.contiguous().cpu()
            factors[f"{module}.lora_R"] = torch.diag(s).cpu()
            factors[f"{module}.lora_A"] = vh.contiguous().cpu()
            if progress is not None:
                progress(done, len(weights))
    factors |= {name: update.get(name) for name in head}

    meta = artifacts.provenance(
        "factors",
        base_model=update.meta["base_model"],
        targets=update.meta["targets"],
        method="lorasb",
        init="lorasb",
        rank=rank,
        scale=1.0,
        eta=update.meta["eta"],
        data=update.meta["data"],
        samples=update.meta["samples"],
        seed=seed,
        svd={"exact": exact, "niter": niter, "oversampling": oversampling(rank)},
        energy=energy,
        **{key: update.meta[key] for key in ("architecture", "labels", "head") if key in update.meta},
    )
    artifacts.write_artifact(out, factors, meta)
    return DecomposeSummary(path=Path(out), rank=rank, energy=energy)
