"""`lora-pro`: LoRA-Pro (Wang et al., arXiv 2407.18242, ICLR 2025). PEFT's LoRA layers (init, forward and export
exactly as `lora`, α = 2r as the paper's scripts: r = 8, α = 16); only the optimizer differs.

A step of LoRA moves W = W0 + s·B·A by the *equivalent gradient* s·(B·g_A + g_B·A) (to first order). LoRA-Pro picks
g_A [r, n], g_B [m, r] so that it is the best approximation of the full gradient g = ∂L/∂W [m, n], using only the
LoRA gradients ∂L/∂A = s·Bᵀ·g and ∂L/∂B = s·g·Aᵀ (never g itself). Its Theorem 2.1:

    g_A = (1/s²)·(BᵀB)⁻¹·∂L/∂A + X·A
    g_B = (1/s²)·(I − B(BᵀB)⁻¹Bᵀ)·∂L/∂B·(AAᵀ)⁻¹ − B·X

for any X [r, r]; the equivalent gradient is then the orthogonal projection of g onto the tangent space
{B·X' + Y·A}: g − (I − P_B)·g·(I − P_A). Theorem 2.3 takes the X keeping g_A, g_B closest to the LoRA gradients
(min ‖g_A − ∂L/∂A‖² + ‖g_B − ∂L/∂B‖²), the unique solution of the Sylvester equation

    BᵀB·X + X·AAᵀ = −(1/s²)·(BᵀB)⁻¹·∂L/∂A·Aᵀ.

AdamW (the paper's Algorithm 1): the moments are kept on the equivalent gradient g̃ [m, n] itself,
m ← β1·m + (1 − β1)·g̃, v ← β2·v + (1 − β2)·g̃², D = (m/(1 − β1ᵗ)) / (√(v/(1 − β2ᵗ)) + ε); D is then treated as a
full gradient: its LoRA gradients s·Bᵀ·D, s·D·Aᵀ go through the same closed form (with X), and
A ← A − lr·(g_A + λ·A), B ← B − lr·(g_B + λ·B), λ the Trainer's weight_decay (`--weight-decay`, default 0
as in the paper's scripts). A classifier's head gets plain AdamW.

Memory: m and v are full-size, 2·m·n float32 values per target module (8·m·n bytes: the AdamW state of full
fine-tuning, e.g. ~52 GB for every linear layer of a 7B model) instead of LoRA's 2·r·(m + n), plus a few
transient [m, n] buffers for the module being stepped. The (BᵀB)⁻¹, (AAᵀ)⁻¹ are pseudo-inverses (eigh, in
float64): at PEFT's init B = 0, where the formulas give g_A = 0 and g̃ = g·Aᵀ(AAᵀ)⁻¹A, the projection onto that
tangent space.
The Trainer's `optimizers=` takes it, so FSDP and DeepSpeed (which forbid that) cannot run this method; DDP can.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from . import Prepared, Setup
from .peft_lora import lora_layers, prepare_peft

Spectrum = tuple[torch.Tensor, torch.Tensor]  # eigh of BᵀB or AAᵀ: eigenvalues [r], eigenvectors [r, r]


def gram_spectra(lora_B: torch.Tensor, lora_A: torch.Tensor) -> tuple[Spectrum, Spectrum]:
    """eigh of BᵀB and AAᵀ [r, r] in float64 (their condition number is B's, A's squared); one pair per step serves
    the pseudo-inverses and the Sylvester solve of both closed forms."""
    B, A = lora_B.double(), lora_A.double()
    return torch.linalg.eigh(B.T @ B), torch.linalg.eigh(A @ A.T)


def _above_roundoff(values: torch.Tensor) -> torch.Tensor:
    # Eigenvalues at round-off level count as zero: B = 0 (PEFT's init) must give (BᵀB)⁺ = 0, not 1/ε.
    return values > values.max().clamp(min=0) * values.shape[-1] * torch.finfo(values.dtype).eps


def _pinv(spectrum: Spectrum) -> torch.Tensor:
    """Pseudo-inverse [r, r] of the PSD matrix with this spectrum."""
    eigvals, vecs = spectrum
    inverse = torch.where(_above_roundoff(eigvals), 1 / eigvals, torch.zeros_like(eigvals))
    return (vecs * inverse) @ vecs.mT


def _sylvester(spectrum_B: Spectrum, spectrum_A: Spectrum, rhs: torch.Tensor) -> torch.Tensor:
    # In the eigenbases (BᵀB = U·Λ·Uᵀ, AAᵀ = V·M·Vᵀ) the equation is diagonal: (λ_i + μ_j)·(UᵀXV)_ij = (UᵀCV)_ij.
    # λ_i + μ_j > 0 unless both are singular; such entries get 0 (the least-norm solution).
    (lam, u), (mu, v) = spectrum_B, spectrum_A
    denom = lam[:, None] + mu[None, :]
    inner = torch.where(_above_roundoff(denom), (u.mT @ rhs @ v) / denom, torch.zeros_like(denom))
    return u @ inner @ v.mT


def solve_sylvester(gram_B: torch.Tensor, gram_A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """X [r, r] with gram_B·X + X·gram_A = rhs, for symmetric PSD gram_B = BᵀB, gram_A = AAᵀ [r, r]."""
    return _sylvester(torch.linalg.eigh(gram_B), torch.linalg.eigh(gram_A), rhs)


def adjusted_gradients(
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    grad_B: torch.Tensor,
    grad_A: torch.Tensor,
    scale: float,
    *,
    sylvester: bool = True,
    spectra: tuple[Spectrum, Spectrum] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-Pro's (g_B [m, r], g_A [r, n], X [r, r]) from B [m, r], A [r, n] and their LoRA gradients
    ∂L/∂B [m, r], ∂L/∂A [r, n] (Theorem 2.1), X from the Sylvester equation (Theorem 2.3) or 0 (`sylvester=False`:
    the equivalent gradient does not depend on X). `spectra`: `gram_spectra(B, A)` when already computed.
    Computed in float64 (every tensor here is low-rank), returned in B's dtype."""
    dtype = lora_B.dtype
    spectrum_B, spectrum_A = spectra if spectra is not None else gram_spectra(lora_B, lora_A)
    B, A, gB, gA = (t.double() for t in (lora_B, lora_A, grad_B, grad_A))
    inv_B, inv_A = _pinv(spectrum_B), _pinv(spectrum_A)
    c = 1.0 / scale**2
    base_A = c * inv_B @ gA  # (1/s²)(BᵀB)⁻¹·∂L/∂A
    right = gB @ inv_A  # ∂L/∂B·(AAᵀ)⁻¹
    base_B = c * (right - B @ (inv_B @ (B.T @ right)))  # (1/s²)(I − B(BᵀB)⁻¹Bᵀ)·∂L/∂B·(AAᵀ)⁻¹
    if sylvester:
        x = _sylvester(spectrum_B, spectrum_A, -c * inv_B @ gA @ A.T)
    else:
        x = torch.zeros_like(inv_B)
    return (base_B - B @ x).to(dtype), (base_A + x @ A).to(dtype), x.to(dtype)


def equivalent_gradient(
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    grad_B: torch.Tensor,
    grad_A: torch.Tensor,
    scale: float,
    *,
    spectra: tuple[Spectrum, Spectrum] | None = None,
) -> torch.Tensor:
    """s·(B·g_A + g_B·A) [m, n] of LoRA-Pro's g_A, g_B: the full gradient projected onto {B·X + Y·A}."""
    g_B, g_A, _ = adjusted_gradients(lora_B, lora_A, grad_B, grad_A, scale, sylvester=False, spectra=spectra)
    return scale * (lora_B @ g_A + g_B @ lora_A)


class LoraProAdamW(torch.optim.Optimizer):
    """AdamW on the equivalent gradient of each LoRA pair in `pairs` [(B [m, r], A [r, n], s)], plain AdamW on
    `others` (a classifier's head). State of a pair, under its A: step, exp_avg and exp_avg_sq, both [m, n]."""

    def __init__(
        self,
        pairs: Sequence[tuple[nn.Parameter, nn.Parameter, float]],
        others: Iterable[nn.Parameter] = (),
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        groups = [{"params": [lora_B, lora_A], "scale": float(scale)} for lora_B, lora_A, scale in pairs]
        others = list(others)
        if others:
            groups.append({"params": others, "scale": None})
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @staticmethod
    def _adam_direction(state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """m̂/(√v̂ + ε) after adding `grad` to the moments in `state` (created at the first step)."""
        beta1, beta2 = group["betas"]
        if not state:
            state |= {"step": 0, "exp_avg": torch.zeros_like(grad), "exp_avg_sq": torch.zeros_like(grad)}
        state["step"] += 1
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"]
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        return state["exp_avg"] / (1 - beta1**step) / denom

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
            if group["scale"] is None:
                for param in group["params"]:
                    if param.grad is not None:
                        direction = self._adam_direction(self.state[param], param.grad, group)
                        param.mul_(decay).sub_(lr * direction)
                continue
            lora_B, lora_A = group["params"]
            if lora_B.grad is None or lora_A.grad is None:
                continue
            scale = group["scale"]
            spectra = gram_spectra(lora_B, lora_A)
            full = equivalent_gradient(lora_B, lora_A, lora_B.grad, lora_A.grad, scale, spectra=spectra)
            direction = self._adam_direction(self.state[lora_A], full, group)
            # The Adam direction is a full [m, n] "gradient": its own LoRA gradients go through the closed form.
            g_B, g_A, _ = adjusted_gradients(
                lora_B, lora_A, scale * direction @ lora_A.T, scale * lora_B.T @ direction, scale, spectra=spectra
            )
            lora_B.mul_(decay).sub_(lr * g_B)
            lora_A.mul_(decay).sub_(lr * g_A)
        return loss


def prepare(setup: Setup) -> Prepared:
    prepared = prepare_peft(setup, alpha=setup.options.alpha_or(2 * setup.rank))
    pairs = [
        (layer.lora_B["default"].weight, layer.lora_A["default"].weight, layer.scaling["default"])
        for layer in lora_layers(prepared.model).values()
    ]
    paired = {id(p) for lora_B, lora_A, _ in pairs for p in (lora_B, lora_A)}
    others = [p for p in prepared.model.parameters() if p.requires_grad and id(p) not in paired]

    def optimizer(args) -> LoraProAdamW:
        return LoraProAdamW(
            pairs,
            others,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )

    prepared.optimizer = optimizer
    prepared.config["optimizer"] = "lora-pro-adamw: full-size moments of the equivalent gradient"
    return prepared
