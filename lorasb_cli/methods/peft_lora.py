"""LoRA and its PEFT-implemented variants: `lora`, `rslora`, `dora`, `pissa`, `loraga` (PEFT's own code).

Defaults: α = 2r for LoRA, rsLoRA, DoRA and LoRA-GA (the LoRA-SB paper's appendix), α = r for PiSSA (its
paper: s = 1); `--alpha` overrides. Dropout `--lora-dropout` (default 0). `prepare_peft` also serves the methods PEFT lacks (MiLoRA,
IniLoRA): they hand it a `custom_init` that picks the part B0·A0 of W0 the adapter starts from.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import Prepared, Setup, tensors_of, train_head
from .dora import MAGNITUDE

log = logging.getLogger("lorasb")

# (module, W0 [m, n], rank) → (B0 [m, r], A0 [r, n]): the adapter starts at B0·A0, W0 − B0·A0 stays frozen.
CustomInit = Callable[[str, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers of the wrapped base model, by their module path in the base model."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    return {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}


# Module path → (B0 [m, r], A0 [r, n]) as PEFT holds them (float32, CPU): where the adapter started.
Start = dict[str, tuple[torch.Tensor, torch.Tensor]]


def prepare_peft(
    setup: Setup,
    *,
    alpha: float,
    init_lora_weights: bool | str = True,
    use_rslora: bool = False,
    use_dora: bool = False,
    custom_init: CustomInit | None = None,
    lora_ga: bool = False,
) -> Prepared:
    """Wrap `setup.model` in PEFT LoRA adapters of rank r on `setup.modules`, optionally starting at B0·A0 ≠ 0."""
    from peft import get_peft_model

    model = setup.model
    # A classifier's head trains as float32 master weights (PEFT upcasts only its own LoRA A/B and DoRA magnitude).
    head = train_head(model)
    config = lora_config(
        setup,
        alpha=alpha,
        init_lora_weights=init_lora_weights,
        use_rslora=use_rslora,
        use_dora=use_dora,
        lora_ga=lora_ga,
    )
    if lora_ga:
        preprocess_lora_ga(setup, config)
    peft_model = get_peft_model(model, config)
    layers = lora_layers(peft_model)
    if custom_init is not None:
        apply_custom_init(layers, custom_init, setup.rank)
    # Methods that moved B0·A0 out of W0 export the start too, so the adapter is relative to the original W0.
    moves_w0 = custom_init is not None or lora_ga or init_lora_weights == "pissa"
    initial = snapshot_start(layers) if moves_w0 else {}
    for p in head.values():  # get_peft_model froze every non-adapter parameter
        p.requires_grad_(True)
    settings = {
        "alpha": alpha,
        "lora_scale": alpha / (math.sqrt(setup.rank) if use_rslora else setup.rank),
        "scale": 1.0,
        "peft": {"init_lora_weights": init_lora_weights, "use_rslora": use_rslora, "use_dora": use_dora},
    }
    export = PeftExport(layers=layers, initial=initial, head=head, use_dora=use_dora)
    return Prepared(model=peft_model, export=export, config=settings)


def lora_config(
    setup: Setup, *, alpha: float, init_lora_weights: bool | str, use_rslora: bool, use_dora: bool, lora_ga: bool
):
    """PEFT's LoraConfig: rank r on `setup.modules`, dropout --lora-dropout, no bias; LoRA-GA's defaults when
    `lora_ga`."""
    from peft import LoraConfig

    kwargs = {}
    if lora_ga:
        from peft.tuners.lora.config import LoraGAConfig

        kwargs["lora_ga_config"] = LoraGAConfig()
    return LoraConfig(
        r=setup.rank,
        lora_alpha=alpha,
        target_modules=list(setup.modules),
        lora_dropout=setup.options.lora_dropout,
        bias="none",
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=init_lora_weights,
        **kwargs,
    )


def preprocess_lora_ga(setup: Setup, config) -> None:
    """LoRA-GA's gradient estimate over --init-samples samples, which PEFT needs before `get_peft_model`."""
    from peft.tuners.lora.loraga import preprocess_loraga

    model = setup.model
    device = next(model.parameters()).device

    def train_step() -> None:
        for batch in setup.batches(setup.options.init_samples):
            model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()

    preprocess_loraga(model, config, train_step)


def apply_custom_init(layers: dict[str, nn.Module], custom_init: CustomInit, rank: int) -> None:
    """Put `custom_init`'s B0 [m, r], A0 [r, n] into each PEFT layer and take B0·A0 out of its W0 [m, n]."""
    with torch.no_grad():
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            lora_B, lora_A = (t.to(weight.device) for t in custom_init(name, weight.detach().float(), rank))
            root = math.sqrt(layer.scaling["default"])  # s·(B0/√s)·(A0/√s) = B0·A0
            layer.lora_B["default"].weight.copy_(lora_B / root)
            layer.lora_A["default"].weight.copy_(lora_A / root)
            weight.copy_((weight.float() - lora_B @ lora_A).to(weight.dtype))


def snapshot_start(layers: dict[str, nn.Module]) -> Start:
    """A float32 CPU copy of each layer's B0 [m, r], A0 [r, n] before training moves them."""
    return {
        n: (
            l.lora_B["default"].weight.detach().float().cpu().clone(),
            l.lora_A["default"].weight.detach().float().cpu().clone(),
        )
        for n, l in layers.items()
    }


@dataclass(frozen=True, kw_only=True, eq=False)  # eq=False: compared and hashed by identity, like a closure
class PeftExport:
    """`Prepared.export` of a PEFT model: per layer B [m, r'], R [r', r'], A [r', n] with ΔW = B·R·A, where
    r' = r, or 2r for a layer in `initial` (the start B0·A0 subtracted again), plus DoRA's magnitude [m] and the
    head's tensors."""

    layers: dict[str, nn.Module]
    initial: Start
    head: dict[str, nn.Parameter]
    use_dora: bool

    def __call__(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, layer in self.layers.items():
            lora_A = layer.lora_A["default"].weight.detach().float().cpu()
            lora_B = layer.lora_B["default"].weight.detach().float().cpu()
            lora_R = layer.scaling["default"] * torch.eye(lora_A.shape[0])
            if name in self.initial:  # W0 − s·B0·A0 + s·B·A = W0 + [B, B0]·diag(s, −s)·[A; A0]
                start_B, start_A = self.initial[name]
                lora_B, lora_A = torch.cat([lora_B, start_B], 1), torch.cat([lora_A, start_A], 0)
                lora_R = torch.block_diag(lora_R, -lora_R)
            tensors |= {f"{name}.lora_B": lora_B, f"{name}.lora_R": lora_R, f"{name}.lora_A": lora_A}
            if self.use_dora:
                magnitude = layer.lora_magnitude_vector["default"].weight.detach().float().cpu()
                tensors[f"{name}.{MAGNITUDE}"] = magnitude
        return tensors | tensors_of(self.head)


def _lora(alpha_per_rank: float = 2, **peft) -> Callable[[Setup], Prepared]:
    """`prepare` of a PEFT LoRA variant with α = `alpha_per_rank`·r unless --alpha."""

    def prepare(setup: Setup) -> Prepared:
        return prepare_peft(setup, alpha=setup.options.alpha_or(alpha_per_rank * setup.rank), **peft)

    return prepare


prepare_lora = _lora()
prepare_rslora = _lora(use_rslora=True)
prepare_dora = _lora(use_dora=True)
prepare_pissa = _lora(1, init_lora_weights="pissa")
prepare_loraga = _lora(init_lora_weights="lora_ga", lora_ga=True)
