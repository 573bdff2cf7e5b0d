"""`kaiming`: the truncated SVD of a Kaiming-uniform matrix of W's shape (paper Table 4's random baseline).

The random matrix is scaled to ‖ΔW_avg‖_F, so R_init is as large as LoRA-SB's and only the subspaces differ:
the ablation isolates the directions that the gradient estimate contributes.
"""

import math

import torch

from . import InitOptions, svd_factors


def factor(delta: torch.Tensor, rank: int, options: InitOptions):
    random = torch.nn.init.kaiming_uniform_(torch.empty_like(delta, dtype=torch.float32), a=math.sqrt(5))
    random *= delta.float().norm() / random.norm()
    u, s, vh = svd_factors(random, rank, options)
    return u, torch.diag(s), vh, s
