"""--method lora-pro: the closed form makes the equivalent gradient the projection of the full gradient, X solves the
paper's Sylvester equation and is the minimizer it claims, an optimizer step is the paper's AdamW written out, and the
adapter trains, merges, exports and resumes like LoRA's."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from lorasb_cli import adapter, merge, methods, train
from lorasb_cli.errors import BadInputError
from lorasb_cli.methods import lora_pro

F64 = torch.float64
M, N, R, S = 12, 9, 3, 2.0  # W [M, N], rank R, LoRA scale s
RANK = 4  # the tiny-model runs
IDS = torch.tensor([[1, 7, 9, 11, 40, 50, 60, 2, 5, 6], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38]])


# ------------------------------------------------------------------------------ the closed form, on fixed tensors


def _problem(seed: int, zero_B: bool = False):
    """W0 [M, N], B [M, R], A [R, N] and a smooth loss of W = W0 + s·B·A on fixed data (float64)."""
    g = torch.Generator().manual_seed(seed)
    w0, lora_B, lora_A = (torch.randn(*shape, generator=g, dtype=F64) for shape in ((M, N), (M, R), (R, N)))
    if zero_B:
        lora_B.zero_()
    x, y = torch.randn(16, N, generator=g, dtype=F64), torch.randn(16, M, generator=g, dtype=F64)

    def loss(weight: torch.Tensor) -> torch.Tensor:
        return ((x @ weight.T).tanh() - y).square().sum()

    return w0, lora_B, lora_A, loss


def _gradients(w0, lora_B, lora_A, loss):
    """(∂L/∂W [M, N] at W = W0 + s·B·A, ∂L/∂B, ∂L/∂A), all by autograd."""
    weight = (w0 + S * lora_B @ lora_A).requires_grad_()
    (full,) = torch.autograd.grad(loss(weight), weight)
    B, A = lora_B.clone().requires_grad_(), lora_A.clone().requires_grad_()
    grad_B, grad_A = torch.autograd.grad(loss(w0 + S * B @ A), (B, A))
    return full, grad_B, grad_A


def _projector(matrix: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the column space of a full-column-rank `matrix`: M(MᵀM)⁻¹Mᵀ."""
    return matrix @ torch.linalg.inv(matrix.T @ matrix) @ matrix.T


@pytest.mark.parametrize("kind", ["trained", "peft-init", "rank-deficient"])
def test_equivalent_gradient_is_the_projection_of_the_full_gradient(kind):
    w0, lora_B, lora_A, loss = _problem(0, zero_B=kind == "peft-init")
    if kind == "rank-deficient":  # BᵀB singular: its round-off eigenvalue must count as zero, not as 1/ε
        lora_B[:, -1] = 2 * lora_B[:, 0]
    full, grad_B, grad_A = _gradients(w0, lora_B, lora_A, loss)
    # The LoRA gradients are the chain rule of the full one (what the closed form relies on).
    torch.testing.assert_close(grad_A, S * lora_B.T @ full, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_B, S * full @ lora_A.T, atol=1e-12, rtol=0)

    g_B, g_A, _ = lora_pro.adjusted_gradients(lora_B, lora_A, grad_B, grad_A, S)
    equivalent = S * (lora_B @ g_A + g_B @ lora_A)
    # Projection onto {B·X + Y·A}: g − (I − P_B)·g·(I − P_A), P_B onto B's column space (0 at B = 0: g·P_A).
    columns = {"trained": lora_B, "peft-init": None, "rank-deficient": lora_B[:, :-1]}[kind]
    p_B = torch.zeros(M, M, dtype=F64) if columns is None else _projector(columns)
    expected = full - (torch.eye(M, dtype=F64) - p_B) @ full @ (torch.eye(N, dtype=F64) - _projector(lora_A.T))
    torch.testing.assert_close(equivalent, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        lora_pro.equivalent_gradient(lora_B, lora_A, grad_B, grad_A, S), expected, atol=1e-10, rtol=0
    )
    # Vanilla LoRA's equivalent gradient is a worse approximation of the full gradient.
    vanilla = S * (lora_B @ grad_A + grad_B @ lora_A)
    assert float((expected - full).norm()) < float((vanilla - full).norm())


def test_x_solves_the_sylvester_equation_and_is_the_closest_to_the_lora_gradients():
    w0, lora_B, lora_A, loss = _problem(1)
    _, grad_B, grad_A = _gradients(w0, lora_B, lora_A, loss)
    g_B, g_A, x = lora_pro.adjusted_gradients(lora_B, lora_A, grad_B, grad_A, S)
    gram_B, gram_A = lora_B.T @ lora_B, lora_A @ lora_A.T
    # Theorem 2.3: BᵀB·X + X·AAᵀ = −(1/s²)(BᵀB)⁻¹·∂L/∂A·Aᵀ.
    rhs = -torch.linalg.inv(gram_B) @ grad_A @ lora_A.T / S**2
    torch.testing.assert_close(gram_B @ x + x @ gram_A, rhs, atol=1e-12, rtol=0)

    # The X-free parts, and g_A, g_B of Theorem 2.1's form with this X.
    base_B, base_A, zero = lora_pro.adjusted_gradients(lora_B, lora_A, grad_B, grad_A, S, sylvester=False)
    assert not zero.any()
    torch.testing.assert_close(g_A, base_A + x @ lora_A, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_B, base_B - lora_B @ x, atol=1e-12, rtol=0)
    # min over X of ‖base_A + X·A − ∂L/∂A‖² + ‖base_B − B·X − ∂L/∂B‖²: linear least squares in the R² entries of X.
    basis = torch.eye(R * R, dtype=F64).reshape(R * R, R, R)
    design = torch.stack([torch.cat([(e @ lora_A).flatten(), (-lora_B @ e).flatten()]) for e in basis], dim=1)
    target = torch.cat([(grad_A - base_A).flatten(), (grad_B - base_B).flatten()])
    best = torch.linalg.lstsq(design, target[:, None]).solution.reshape(R, R)
    torch.testing.assert_close(x, best, atol=1e-10, rtol=0)


def test_sylvester_solver_on_random_positive_definite_matrices():
    g = torch.Generator().manual_seed(2)
    left, right, rhs = (torch.randn(5, 5, generator=g, dtype=F64) for _ in range(3))
    gram_B, gram_A = left @ left.T, right @ right.T + torch.eye(5, dtype=F64)  # PSD, PD
    x = lora_pro.solve_sylvester(gram_B, gram_A, rhs)
    torch.testing.assert_close(gram_B @ x + x @ gram_A, rhs, atol=1e-10, rtol=0)


# ------------------------------------------------------------------------- the paper's AdamW, written out here


def _sylvester_by_kronecker(gram_B, gram_A, rhs):
    """X with gram_B·X + X·gram_A = rhs, from vec(P·X·Q) = (Qᵀ ⊗ P)·vec(X) (column-major vec)."""
    eye = torch.eye(R, dtype=F64)
    operator = torch.kron(eye, gram_B) + torch.kron(gram_A.T.contiguous(), eye)
    return torch.linalg.solve(operator, rhs.T.reshape(-1)).reshape(R, R).T


def _paper_gradients(lora_B, lora_A, grad_B, grad_A, x_too: bool = True):
    """Theorem 2.1 (X of Theorem 2.3, or 0) with explicit inverses."""
    inv_B, inv_A = torch.linalg.inv(lora_B.T @ lora_B), torch.linalg.inv(lora_A @ lora_A.T)
    x = _sylvester_by_kronecker(lora_B.T @ lora_B, lora_A @ lora_A.T, -inv_B @ grad_A @ lora_A.T / S**2)
    x = x if x_too else torch.zeros_like(x)
    g_A = inv_B @ grad_A / S**2 + x @ lora_A
    g_B = (torch.eye(M, dtype=F64) - lora_B @ inv_B @ lora_B.T) @ grad_B @ inv_A / S**2 - lora_B @ x
    return g_B, g_A


def test_optimizer_steps_are_the_papers_adamw_on_the_equivalent_gradient():
    lr, (beta1, beta2), eps, decay = 0.05, (0.9, 0.99), 1e-8, 0.1
    w0, lora_B, lora_A, loss = _problem(3)
    B, A = torch.nn.Parameter(lora_B.clone()), torch.nn.Parameter(lora_A.clone())
    head = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=F64))
    head_ref = torch.nn.Parameter(head.detach().clone())
    optimizer = lora_pro.LoraProAdamW([(B, A, S)], [head], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=decay)
    reference = torch.optim.AdamW([head_ref], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=decay)
    ref_B, ref_A = lora_B.clone(), lora_A.clone()
    exp_avg, exp_avg_sq = torch.zeros(M, N, dtype=F64), torch.zeros(M, N, dtype=F64)
    for t in (1, 2, 3):
        _, B.grad, A.grad = _gradients(w0, B.detach(), A.detach(), loss)
        head.grad = head_ref.grad = torch.full_like(head, float(t)) - head.detach()
        optimizer.step()
        reference.step()

        # Algorithm 1: Adam moments of the equivalent gradient, bias-corrected; the direction D is a full gradient
        # whose LoRA gradients s·D·Aᵀ, s·Bᵀ·D are adjusted again; decoupled weight decay on A and B.
        _, grad_B, grad_A = _gradients(w0, ref_B, ref_A, loss)
        g_B, g_A = _paper_gradients(ref_B, ref_A, grad_B, grad_A, x_too=False)
        equivalent = S * (ref_B @ g_A + g_B @ ref_A)
        exp_avg = beta1 * exp_avg + (1 - beta1) * equivalent
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * equivalent**2
        direction = (exp_avg / (1 - beta1**t)) / ((exp_avg_sq / (1 - beta2**t)).sqrt() + eps)
        g_B, g_A = _paper_gradients(ref_B, ref_A, S * direction @ ref_A.T, S * ref_B.T @ direction)
        ref_B, ref_A = ref_B - lr * (g_B + decay * ref_B), ref_A - lr * (g_A + decay * ref_A)

        torch.testing.assert_close(B.detach(), ref_B, atol=1e-10, rtol=0)
        torch.testing.assert_close(A.detach(), ref_A, atol=1e-10, rtol=0)
        torch.testing.assert_close(head.detach(), head_ref.detach(), atol=1e-12, rtol=0)  # the head: plain AdamW
    state = optimizer.state[A]
    assert state["step"] == 3 and state["exp_avg"].shape == state["exp_avg_sq"].shape == (M, N)
    torch.testing.assert_close(state["exp_avg"], exp_avg, atol=1e-10, rtol=0)
    assert not optimizer.state[B]  # one full-size state per pair


def test_first_step_from_peft_init_moves_w_by_adam_on_the_projected_gradient():
    """At B = 0: g_A = 0, and s·ΔB·A = −lr·D·P_A with D the Adam direction of g·P_A (A stays, λ = 0)."""
    lr, eps = 0.01, 1e-8
    w0, lora_B, lora_A, loss = _problem(5, zero_B=True)
    B, A = torch.nn.Parameter(lora_B.clone()), torch.nn.Parameter(lora_A.clone())
    full, B.grad, A.grad = _gradients(w0, lora_B, lora_A, loss)
    lora_pro.LoraProAdamW([(B, A, S)], lr=lr, eps=eps).step()
    p_A = _projector(lora_A.T)
    projected = full @ p_A
    direction = projected / (projected.abs() + eps)  # one bias-corrected Adam step: m̂ = g̃, v̂ = g̃²
    torch.testing.assert_close(A.detach(), lora_A, atol=0, rtol=0)
    torch.testing.assert_close(S * B.detach() @ A.detach(), -lr * direction @ p_A, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------ runs on a tiny model


def _config(model_dir, data, out, method="lora-pro", **overrides) -> train.TrainConfig:
    settings = {
        "model": str(model_dir),
        "data": str(data),
        "out": str(out),
        "method": method,
        "rank": RANK,
        "max_steps": 6,
        "logging_steps": 1,
        "lr": 5e-3,
        "batch_size": 4,
        "seed": 0,
        "overwrite": True,
    }
    return train.TrainConfig.from_options(**(settings | overrides))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS.to(next(model.parameters()).device)).logits.detach().float().cpu()


class _Watch(TrainerCallback):
    """The Trainer's optimizer, the loss on the first training samples before and after training, and the trained
    model's logits. Reads the samples by index: iterating the dataloader would draw from the RNG and change the run."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        dataset = train_dataloader.dataset
        self.batch = train_dataloader.collate_fn([dataset[i] for i in range(4)])
        self.before = self._loss(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = self._loss(model)
        was_training = model.training
        model.eval()
        self.logits = _logits(model)
        model.train(was_training)

    def _loss(self, model) -> float:
        device = next(model.parameters()).device
        with torch.no_grad():
            return float(model(**{k: v.to(device) for k, v in self.batch.items()}).loss)


@pytest.fixture(scope="module")
def run(tiny_model_dir, qa_file, tmp_path_factory):
    watch = _Watch()
    out = tmp_path_factory.mktemp("lora-pro") / "run"
    summary = train.train(_config(tiny_model_dir, qa_file, out, save_steps=3), callbacks=[watch])
    return out, summary, watch


def test_registered_with_a_rank():
    method = methods.get_method("lora-pro")
    assert method.uses_rank and not method.needs_factors


def test_trains_with_its_optimizer_under_the_scheduler_and_lowers_the_loss(run, base_model):
    out, summary, watch = run
    assert summary.steps == 6
    assert summary.step0_init_loss == pytest.approx(summary.step0_base_loss, rel=1e-5)  # LoRA's init: B = 0
    assert watch.after < watch.before - 0.05, (watch.before, watch.after)
    # The Trainer stepped LoRA-Pro's optimizer: one full-size [m, n] state per target module.
    optimizer = watch.optimizer
    assert isinstance(optimizer, lora_pro.LoraProAdamW) and len(optimizer.param_groups) == 14
    for group in optimizer.param_groups:
        lora_B, lora_A = group["params"]
        state = optimizer.state[lora_A]
        assert state["step"] == 6 and state["exp_avg"].shape == (lora_B.shape[0], lora_A.shape[1])
    # ... with the --scheduler (linear) built around it.
    metrics = json.loads((out / "metrics.json").read_text())
    rates = [step["lr"] for step in metrics["loss"]]
    assert len(rates) == 6 and rates[0] <= 5e-3 and all(a > b > 0 for a, b in itertools.pairwise(rates)), rates
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == "lora-pro" and config["alpha"] == 2 * RANK and "lora-pro" in config["optimizer"]


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_adapter_merges_and_exports_like_lora(run, tiny_model_dir, base_model, tmp_path):
    import peft

    out, _, watch = run
    saved = adapter.load_adapter(out)
    assert len(saved.factors) == 14
    for module, (lora_B, lora_R, lora_A) in saved.factors.items():  # rank r, R = s·I with s = α/r = 2
        assert lora_B.shape[1] == lora_A.shape[0] == RANK, module
        torch.testing.assert_close(lora_R, 2.0 * torch.eye(RANK), atol=0, rtol=0, msg=module)
    hf_dir = merge.merge(
        merge.MergeConfig(adapter=str(out), out=str(tmp_path / "hf"), model=str(tiny_model_dir), format="hf")
    )
    merged = _logits(AutoModelForCausalLM.from_pretrained(hf_dir).eval())
    peft_dir = merge.merge(
        merge.MergeConfig(adapter=str(out), out=str(tmp_path / "peft"), model=str(tiny_model_dir), format="peft")
    )
    exported = _logits(
        peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(peft_dir)).eval()
    )
    assert float((merged - _logits(base_model)).abs().max()) > 1e-2
    torch.testing.assert_close(merged, watch.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exported, merged, atol=1e-4, rtol=1e-4)


def test_resumes_to_the_uninterrupted_adapter(run, tiny_model_dir, qa_file, tmp_path):
    """The full-size moments are in the checkpoint: resumed at step 3, the run ends at the same adapter."""
    out, _, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "adapter.safetensors").unlink()
    shutil.rmtree(copy / "checkpoint-6")

    seen: list[int] = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    summary = train.train(
        _config(tiny_model_dir, qa_file, copy, save_steps=3, resume=True, overwrite=False), callbacks=[Steps()]
    )
    assert summary.steps == 6 and seen == [4, 5, 6]  # it continued from checkpoint-3
    full, resumed = load_file(out / "adapter.safetensors"), load_file(copy / "adapter.safetensors")
    assert set(full) == set(resumed)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"rank": None}, "--method lora-pro needs --rank"),
        ({"factors": "FACTORS"}, "--factors is for --method lorasb, not lora-pro"),
        ({"init_scale": 2.0}, "--init-scale applies to --method lorasb only"),
        ({"method": "lora-prp"}, "unknown --method 'lora-prp'"),
    ],
)
def test_bad_options(tiny_model_dir, qa_file, tmp_path, overrides, pattern):
    overrides = {k: str(tmp_path / "factors.safetensors") if v == "FACTORS" else v for k, v in overrides.items()}
    with pytest.raises(BadInputError, match=pattern):
        train.train(_config(tiny_model_dir, qa_file, tmp_path / "run", **overrides))
    assert not (tmp_path / "run" / "adapter.safetensors").exists()
