"""Per-module ranks under a budget of trainable parameters (`lorasb decompose --budget`).

LoRA-SB trains r_l² parameters in module l, so a budget N is Σ_l r_l² ≤ N. Each module's matrix has singular
values σ_1 ≥ σ_2 ≥ ...; raising its rank from r to r + 1 captures σ²_{r+1} / ‖ΔW_l‖²_F more of its energy and costs
(r + 1)² − r² = 2r + 1 parameters. The allocation is greedy on that ratio: from `min_rank` everywhere, the step
with the most captured energy per added parameter is taken while it fits. The ratio falls with r in every
module, so each module's steps are taken in order and equal spectra end at equal ranks. Energy is measured as a
fraction of each module's own norm: the sign update has ‖ΔW_l‖²_F = η²·m·n, a size rather than an importance.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import torch

from .errors import BadInputError


def uniform_parameters(rank: int, modules: int) -> int:
    """LoRA-SB's trainable count at one rank everywhere: modules × r²."""
    return modules * rank * rank


def allocate_ranks(
    energy: Mapping[str, torch.Tensor], budget: int, min_rank: int, max_ranks: Mapping[str, int]
) -> dict[str, int]:
    """A rank per module with Σ r² ≤ `budget`. `energy[module]` [k] holds σ_i² / ‖ΔW‖²_F of its top k ≥
    max_ranks[module] singular values, descending; every rank stays in [min_rank, max_ranks[module]]."""
    floor = sum(min(min_rank, max_ranks[m]) ** 2 for m in energy)
    if floor > budget:
        raise BadInputError(
            f"--budget {budget:,} is below {floor:,}, the count at --min-rank {min_rank} in all {len(energy)} modules",
            hint="raise --budget or lower --min-rank",
        )
    ranks = {m: min(min_rank, max_ranks[m]) for m in energy}
    left = budget - floor
    # Max-heap on captured energy per added parameter; ties go to the module listed first.
    order = {m: i for i, m in enumerate(energy)}
    heap = [(-_gain(energy[m], r), order[m], m) for m, r in ranks.items() if r < max_ranks[m]]
    heapq.heapify(heap)
    while heap:
        _, _, module = heapq.heappop(heap)
        cost = 2 * ranks[module] + 1
        if cost > left:
            continue  # this module's next step no longer fits; a cheaper module's may
        ranks[module] += 1
        left -= cost
        if ranks[module] < max_ranks[module]:
            heapq.heappush(heap, (-_gain(energy[module], ranks[module]), order[module], module))
    return ranks


def _gain(energy: torch.Tensor, rank: int) -> float:
    """Captured energy per parameter of the step rank → rank + 1."""
    return float(energy[rank]) / (2 * rank + 1)
