"""`lorasb` (default): R (r×r) only, between the frozen B and A of a factors file (`lorasb decompose`)."""

from __future__ import annotations

import logging

import torch

from .. import adapter
from . import Prepared, Setup

log = logging.getLogger("lorasb")

# Factors of R_init that `--init-scale auto` tries: 10^(k/2) from 0.001 to 100 (η ± 3 decades).
INIT_SCALE_GRID = tuple(10 ** (k / 2) for k in range(-6, 5))


@torch.no_grad()
def choose_init_scale(layers: dict[str, adapter.LoraSBLinear], probe_loss) -> tuple[float, list[tuple[float, float]]]:
    """The factor of R_init, from INIT_SCALE_GRID, with the lowest probe loss (forward passes only).

    η only scales R_init (B and A do not depend on it), so the size of the simulated first step can be
    chosen after the fact. Returns the factor and the (factor, loss) curve; R is left as it was.
    """
    initial = {name: layer.lora_R.detach().clone() for name, layer in layers.items()}
    curve = []
    for factor in INIT_SCALE_GRID:
        for name, layer in layers.items():
            layer.lora_R.copy_(initial[name] * factor)
        curve.append((factor, probe_loss()))
    for name, layer in layers.items():
        layer.lora_R.copy_(initial[name])
    return min(curve, key=lambda point: point[1])[0], curve


def prepare(setup: Setup) -> Prepared:
    factors = setup.factors
    model = setup.model
    layers = adapter.inject(model, factors.factors, scale=factors.scale)
    # A classifier's head starts as the one G was estimated with and trains with R (PEFT's modules_to_save).
    adapter.load_extra(model, {n: factors.extra[n] for n in factors.meta.head}, trainable=True)

    # On resume the checkpoint's R replaces R_init: nothing to scale or choose.
    init_scale = 1.0 if setup.resumes else setup.options.init_scale
    curve = None
    if init_scale == "auto":
        init_scale = 1.0
        if setup.probe_loss is not None:
            init_scale, curve = choose_init_scale(layers, lambda: setup.probe_loss(model))
            log.info(
                "--init-scale auto: probe loss by scale %s → %g",
                ", ".join(f"{k:g}: {v:.4f}" for k, v in curve),
                init_scale,
            )
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_R.mul_(init_scale)
    config = {
        "init": factors.meta.init or "lorasb",
        "init_scale": init_scale,
        "init_scale_curve": curve,
        "eta": factors.meta.eta,
        "scale": factors.scale,
    }
    return Prepared(model=model, export=lambda: adapter.adapter_tensors(model), config=config)
