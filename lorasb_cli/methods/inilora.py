"""`inilora`, `inilora-alpha`, `inilora-beta` (IniLoRA, arXiv 2510.03731): B [m, r], A [r, n] fitted to W0 by
gradient descent on ‖W0 − B·A‖²_F, then trained as LoRA with the residual W0 − B·A frozen.

The fit starts from N(μ, σ²) with W0's own mean and std (`inilora`), N(0, 0.5²) (`-alpha`) or Kaiming-uniform
(`-beta`), and runs Adam (lr 5e-4, StepLR halving at every third of the run) for `--init-iters` iterations.
Modules of one shape are fitted together as a batch (each its own loss, so the result is the same as one by
one). The fit depends only on the weights, rank, variant, iterations and seed: it is cached under
`$LORASB_HOME/inilora/` and runs once.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import bundled, files
from . import Prepared, Setup
from .peft_lora import prepare_peft

log = logging.getLogger("lorasb")

FIT_LR = 5e-4
VARIANTS = ("inilora", "inilora-alpha", "inilora-beta")


def start(variant: str, weights: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The starting B [k, m, r] and A [k, r, n] for k stacked weights [k, m, n]."""
    k, m, n = weights.shape
    if variant == "inilora":
        mean = weights.mean(dim=(1, 2), keepdim=True)
        std = weights.std(dim=(1, 2), keepdim=True)
        return mean + std * torch.randn(k, m, rank), mean + std * torch.randn(k, rank, n)
    if variant == "inilora-alpha":
        return 0.5 * torch.randn(k, m, rank), 0.5 * torch.randn(k, rank, n)
    lora_B, lora_A = torch.empty(k, m, rank), torch.empty(k, rank, n)
    for tensor in (*lora_B, *lora_A):
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return lora_B, lora_A


def fit(variant: str, weights: torch.Tensor, rank: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Fit B·A to each of the stacked weights [k, m, n]; returns B, A and ‖W0 − B·A‖_F (summed) per iteration."""
    weights = weights.float()
    lora_B, lora_A = (t.requires_grad_(True) for t in start(variant, weights, rank))
    optimizer = torch.optim.Adam([lora_B, lora_A], lr=FIT_LR)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, iters // 3), gamma=0.5)
    history = []
    for _ in range(iters):
        optimizer.zero_grad(set_to_none=True)
        residual = (weights - lora_B @ lora_A).square().sum(dim=(1, 2))  # [k]: one loss per module
        residual.sum().backward()
        optimizer.step()
        schedule.step()
        history.append(float(residual.detach().sqrt().sum()))
    return lora_B.detach(), lora_A.detach(), history


def fit_model(setup: Setup, variant: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (B, A)} for every target of `setup.model`, from the cache when the same fit ran before."""
    weights = {m: setup.model.get_submodule(m).weight.detach().float().cpu() for m in setup.modules}
    digest = hashlib.sha256(f"{variant}|{setup.rank}|{setup.options.init_iters}|{setup.seed}".encode())
    for module, weight in weights.items():
        digest.update(module.encode())
        digest.update(weight.numpy().tobytes())
    cache = bundled.cache_home() / "inilora" / f"{digest.hexdigest()[:24]}.safetensors"
    if cache.is_file():
        saved = load_file(cache)
        log.info("%s: fit of W0 read from %s", variant, cache)
        return {m: (saved[f"{m}.lora_B"], saved[f"{m}.lora_A"]) for m in setup.modules}

    groups: dict[tuple[int, int], list[str]] = {}
    for module, weight in weights.items():
        groups.setdefault(tuple(weight.shape), []).append(module)
    fits = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(setup.seed)
        for shape, modules in groups.items():
            lora_B, lora_A, history = fit(
                variant, torch.stack([weights[m] for m in modules]), setup.rank, setup.options.init_iters
            )
            log.info(
                "%s: ‖W0 − B·A‖ of %d modules %s: %.4g → %.4g", variant, len(modules), shape, history[0], history[-1]
            )
            fits |= {m: (lora_B[i], lora_A[i]) for i, m in enumerate(modules)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(cache) as tmp:
        tensors = {f"{m}.{k}": t.contiguous() for m, (b, a) in fits.items() for k, t in (("lora_B", b), ("lora_A", a))}
        save_file(tensors, tmp)
    return fits


def _prepare(variant: str) -> Callable[[Setup], Prepared]:
    """`prepare` of an IniLoRA variant: PEFT LoRA started at the fit of W0, α = 2r unless --alpha."""

    def prepare(setup: Setup) -> Prepared:
        fits = fit_model(setup, variant)
        prepared = prepare_peft(
            setup, alpha=setup.options.alpha_or(2 * setup.rank), custom_init=lambda module, weight, rank: fits[module]
        )
        prepared.config |= {"init_iters": setup.options.init_iters, "fit_lr": FIT_LR}
        return prepared

    return prepare


prepare_inilora = _prepare("inilora")
prepare_inilora_alpha = _prepare("inilora-alpha")
prepare_inilora_beta = _prepare("inilora-beta")
