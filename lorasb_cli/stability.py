"""How stable the estimate is (`lorasb estimate --report-ranks`): the sample split in two halves, each half's
sign update, and the overlap of their top-r singular subspaces per module.

The overlap of two r-dimensional subspaces with orthonormal bases U_a, U_b is ‖U_aᵀU_b‖²_F / r, the mean cos² of
their principal angles: 1 when they are the same, r/m on average for two random ones in R^m. It is taken for
B's side (left singular vectors, m rows) and A's (right, n columns). A value near 1 says more samples would not
move the factors decompose makes at that rank; a value near the random one says the rank reaches into noise.
"""

from __future__ import annotations

import re

import torch

from . import linalg
from .errors import BadInputError

COMMON_RANKS = (8, 16, 32, 64, 96, 128, 256)


def parse_ranks(spec: str | None, shapes: dict[str, tuple[int, int]]) -> list[int]:
    """`--report-ranks`: a comma list, or `auto` for the COMMON_RANKS up to the largest min(m, n); [] for None."""
    if spec is None:
        return []
    largest = max(min(shape) for shape in shapes.values())
    if spec.strip() == "auto":
        return [r for r in COMMON_RANKS if r <= largest]
    try:
        ranks = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise BadInputError(f"--report-ranks '{spec}' must be a comma list of ranks or auto") from None
    if not ranks or ranks[0] < 1 or ranks[-1] > largest:
        raise BadInputError(
            f"--report-ranks '{spec}' must hold ranks from 1 to {largest} (the largest min(m, n))",
            hint="e.g. --report-ranks 32,64,96, or auto",
        )
    return ranks


def overlap(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean cos² of the principal angles between the column spans of orthonormal `first`, `second` [m, r]."""
    return float((first.T @ second).square().sum() / first.shape[1])


def stability(
    first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], ranks: list[int], *, niter: int, seed: int
) -> dict:
    """Per module, at each rank ≤ min(m, n): the overlap of the halves' top-r subspaces of sign(G_half) on B's
    side and A's, with the random values r/m and r/n beside them. `first`/`second` are G of each half [m, n]."""
    modules = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, g_first in first.items():
            m, n = g_first.shape
            own = [r for r in ranks if r <= min(m, n)]
            if not own:
                continue
            u_a, _, vh_a = linalg.truncated_svd(torch.sign(g_first.float()), own[-1], niter=niter)
            u_b, _, vh_b = linalg.truncated_svd(torch.sign(second[name].float()), own[-1], niter=niter)
            modules[name] = {
                "ranks": own,
                "B": [overlap(u_a[:, :r], u_b[:, :r]) for r in own],
                "A": [overlap(vh_a[:r].T, vh_b[:r].T) for r in own],
                "random_B": [r / m for r in own],
                "random_A": [r / n for r in own],
            }
    return {"ranks": ranks, "modules": modules}


def top_subspaces(
    sums: dict[str, torch.Tensor], rank: int, *, niter: int, seed: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, orthonormal bases of the top-min(rank, m, n) left [m, r] and right [n, r] singular subspaces of
    sign(G) (float32, CPU): what two successive estimates of --samples auto compare."""
    bases = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, g in sums.items():
            u, _, vh = linalg.truncated_svd(torch.sign(g.float()), min(rank, *g.shape), niter=niter)
            bases[name] = (u.cpu(), vh.T.cpu())
    return bases


def mean_overlap(
    first: dict[str, tuple[torch.Tensor, torch.Tensor]], second: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """The overlap of two top_subspaces results: the mean over modules and over B's and A's sides."""
    values = [overlap(first[name][side], second[name][side]) for name in first for side in (0, 1)]
    return sum(values) / len(values)


def by_kind(report: dict) -> list[tuple[str, int, float, float, float]]:
    """(module kind with layer numbers as *, rank, mean overlap of B's and A's sides, the lowest module's, the
    random value) for each kind and rank of a stability report."""
    groups: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for name, entry in report["modules"].items():
        kind = re.sub(r"\.\d+\.", ".*.", name)
        for i, rank in enumerate(entry["ranks"]):
            mean = (entry["B"][i] + entry["A"][i]) / 2
            groups.setdefault((kind, rank), []).append((mean, (entry["random_B"][i] + entry["random_A"][i]) / 2))
    return [
        (kind, rank, sum(v for v, _ in values) / len(values), min(v for v, _ in values), values[0][1])
        for (kind, rank), values in groups.items()
    ]
