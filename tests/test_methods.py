"""train --method: every method's adapter reproduces the trained model through merge (hf) and PEFT's own forward,
the W0-changing methods start from the right singular subspaces, IniLoRA's fit, step-0 losses, bad inputs, resume."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, TrainerCallback

from lorasb_cli import adapter, merge, methods, options, train
from lorasb_cli.errors import BadInputError, IncompatibleArtifactError
from lorasb_cli.methods import inilora, milora
from lorasb_cli.registry import did_you_mean

RANK = 4
PEFT_METHODS = ["lora", "rslora", "dora", "pissa", "loraga", "milora", "inilora"]
MOVES_W0 = {"pissa", "loraga", "milora", "inilora", "inilora-alpha", "inilora-beta"}  # exported at rank 2r
IDS = torch.tensor([[1, 7, 9, 11, 40, 50, 60, 2, 5, 6], [1, 30, 31, 32, 33, 34, 35, 36, 37, 38]])


@pytest.fixture(autouse=True)
def _lorasb_home(tmp_path_factory, monkeypatch):
    """IniLoRA caches its fit under $LORASB_HOME: never the user's cache."""
    monkeypatch.setenv("LORASB_HOME", str(tmp_path_factory.getbasetemp() / "lorasb-home"))


def _config(model_dir, data, out, method, **overrides) -> train.TrainConfig:
    settings = {
        "model": str(model_dir),
        "data": str(data),
        "out": str(out),
        "method": method,
        "max_steps": 2,
        "lr": 1e-2,
        "batch_size": 4,
        "seed": 0,
        "overwrite": True,
    }
    # The method's own options, those it takes: a short IniLoRA fit and LoRA-GA gradient.
    own = {"rank": RANK, "init_iters": 10, "init_samples": 8}
    settings |= {k: v for k, v in own.items() if options.takes(methods.get_method(method).options, k)}
    settings.update(overrides)
    return train.TrainConfig.from_options(**settings)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS.to(next(model.parameters()).device)).logits.detach().float().cpu()


class _FinalLogits(TrainerCallback):
    """The trained model's own logits (PEFT's forward over W_res for PiSSA & co.) when training ends."""

    logits: torch.Tensor | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        self.logits = _logits(model)
        model.train(was_training)


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def base_logits(base_model):
    return _logits(base_model)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, qa_file, tmp_path_factory):
    """method → (run dir, TrainSummary, logits of the trained model); each method trains once per module."""
    runs: dict[str, tuple] = {}
    folder = tmp_path_factory.mktemp("methods")

    def get(method: str):
        if method not in runs:
            capture = _FinalLogits()
            summary = train.train(_config(tiny_model_dir, qa_file, folder / method, method), callbacks=[capture])
            runs[method] = (folder / method, summary, capture.logits)
        return runs[method]

    return get


def _load_peft(model_dir, peft_dir):
    import peft

    return peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(peft_dir)).eval()


def _projector(matrix: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(matrix.double())
    return q @ q.T


def test_registry_names():
    assert set(methods.METHODS) == {
        "lorasb",
        "lora",
        "rslora",
        "dora",
        "pissa",
        "loraga",
        "milora",
        "inilora",
        "inilora-alpha",
        "inilora-beta",
        "lora-pro",
        "full",
        "head",
    }
    assert methods.METHODS["lorasb"].needs_factors and not methods.METHODS["lora"].needs_factors
    assert not methods.METHODS["full"].uses_rank and not methods.METHODS["head"].uses_rank


# --------------------------------------------------------------------------------- adapters of PEFT methods


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_method_adapter_reproduces_the_trained_model(method, trained, tiny_model_dir, base_logits, tmp_path):
    run, summary, trained_logits = trained(method)
    assert summary.steps == 2
    saved = adapter.load_adapter(run)
    assert saved.fields["method"] == method and saved.fields["rank"] == RANK and len(saved.factors) == 14
    export_rank = 2 * RANK if method in MOVES_W0 else RANK
    for module, (lora_B, lora_R, lora_A) in saved.factors.items():
        assert lora_R.shape == (export_rank, export_rank), module
        assert lora_B.shape[1] == export_rank and lora_A.shape[0] == export_rank
    assert set(saved.module_tensors) == (set(saved.factors) if method == "dora" else set())

    hf_dir = merge.merge(
        merge.MergeConfig(adapter=str(run), out=str(tmp_path / "hf"), model=str(tiny_model_dir), format="hf")
    )
    merged = _logits(AutoModelForCausalLM.from_pretrained(hf_dir).eval())
    peft_dir = merge.merge(
        merge.MergeConfig(adapter=str(run), out=str(tmp_path / "peft"), model=str(tiny_model_dir), format="peft")
    )
    peft_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert peft_config["r"] == export_rank and peft_config["use_dora"] == (method == "dora")
    exported = _logits(_load_peft(tiny_model_dir, peft_dir))

    # Training moved the model, and both exports give the trained model's own forward.
    assert float((merged - base_logits).abs().max()) > 1e-2
    torch.testing.assert_close(merged, trained_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exported, merged, atol=1e-4, rtol=1e-4)
    # So does the adapter unmerged, through the method's layer variant (evaluate's forward).
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    variant = methods.layer_variant(method)
    adapter.inject(model, saved.factors, scale=saved.scale, variant=variant, tensors=saved.module_tensors)
    torch.testing.assert_close(_logits(model), trained_logits, atol=1e-4, rtol=1e-4)


def test_full_fine_tune_merges_as_full_tensors_and_has_no_peft_form(
    trained, tiny_model_dir, base_model, base_logits, tmp_path
):
    run, summary, trained_logits = trained("full")
    assert summary.trainable_params == summary.base_params
    saved = adapter.load_adapter(run)
    assert saved.factors == {} and set(saved.extra) == {n for n, _ in base_model.named_parameters()}
    # The base model with the adapter's tensors loaded in place is the trained model.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapter.load_extra(model, saved.extra, trainable=False)
    loaded = _logits(model)
    assert float((loaded - base_logits).abs().max()) > 1e-2
    torch.testing.assert_close(loaded, trained_logits, atol=1e-5, rtol=1e-5)

    hf_dir = merge.merge(
        merge.MergeConfig(adapter=str(run), out=str(tmp_path / "hf"), model=str(tiny_model_dir), format="hf")
    )
    merged = _logits(AutoModelForCausalLM.from_pretrained(hf_dir).eval())
    torch.testing.assert_close(merged, loaded, atol=1e-5, rtol=1e-5)
    with pytest.raises(IncompatibleArtifactError, match="no B, R, A factors"):
        merge.merge(
            merge.MergeConfig(adapter=str(run), out=str(tmp_path / "peft"), model=str(tiny_model_dir), format="peft")
        )
    assert not (tmp_path / "peft").exists()


# ------------------------------------------------------------------------------- where the starts come from


def _start_parts(run) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{module: (B0 [m, r], A0 [r, n], R') } of a rank-2r export B' = [B, B0], A' = [A; A0]."""
    saved = adapter.load_adapter(run)
    return {m: (b[:, RANK:], a[RANK:], r) for m, (b, r, a) in saved.factors.items()}


@pytest.mark.parametrize(("method", "end"), [("milora", "bottom"), ("pissa", "top")])
def test_start_spans_the_singular_subspaces_of_w0(method, end, trained, base_model):
    run, _, _ = trained(method)
    starts = _start_parts(run)
    assert len(starts) == 14
    for module, (start_B, start_A, lora_R) in starts.items():
        # α = r for both: s = 1, R' = diag(I, −I).
        torch.testing.assert_close(lora_R, torch.block_diag(torch.eye(RANK), -torch.eye(RANK)), atol=0, rtol=0)
        weight = base_model.get_submodule(module).weight.detach().double()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        part = slice(-RANK, None) if end == "bottom" else slice(None, RANK)
        left = _projector(start_B) - u[:, part] @ u[:, part].T
        right = _projector(start_A.T) - vh[part].T @ vh[part]
        assert float(left.norm()) < 1e-3 and float(right.norm()) < 1e-3, module
        # The start is that part of W0 itself: B0·A0 = U S Vᵀ over those singular values.
        expected = u[:, part] @ torch.diag(s[part]) @ vh[part]
        product = start_B.double() @ start_A.double()
        error = torch.linalg.matrix_norm(product - expected) / torch.linalg.matrix_norm(expected)
        assert float(error) < 1e-4, module


@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (20, 20)])
def test_minor_components_are_the_bottom_singular_triplets(shape):
    torch.manual_seed(0)
    weight = torch.randn(*shape) @ torch.diag(torch.logspace(0, -2, shape[1]))  # distinct singular values
    start_B, start_A = milora.minor_components("m", weight, 3)
    assert start_B.shape == (shape[0], 3) and start_A.shape == (3, shape[1])
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    expected = u[:, -3:] @ torch.diag(s[-3:]) @ vh[-3:]
    torch.testing.assert_close(start_B.double() @ start_A.double(), expected, atol=1e-6, rtol=0)
    # Split as √S on either side: the columns of B0 and the rows of A0 have squared norms S_min.
    torch.testing.assert_close(start_B.double().norm(dim=0).square(), s[-3:], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(start_A.double().norm(dim=1).square(), s[-3:], atol=1e-6, rtol=1e-4)
    # What is left, W0 − B0·A0, has exactly W0's top singular values.
    residual = (weight - start_B @ start_A).double()
    torch.testing.assert_close(torch.linalg.svdvals(residual)[:-3], s[:-3], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- IniLoRA


@pytest.mark.parametrize("variant", inilora.VARIANTS)
def test_inilora_fit_decreases_the_residual(variant):
    g = torch.Generator().manual_seed(0)
    weights = torch.stack(
        [
            0.05 * torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g)
            + 0.002 * torch.randn(12, 10, generator=g)
            for _ in range(2)
        ]
    )
    torch.manual_seed(0)
    lora_B, lora_A, history = inilora.fit(variant, weights, 2, 1000)
    assert lora_B.shape == (2, 12, 2) and lora_A.shape == (2, 2, 10) and len(history) == 1000
    # ‖W0 − B·A‖ (summed over the stack) never goes up, falls by a large factor, and never beats Eckart–Young.
    steps = [b - a for a, b in itertools.pairwise(history)]
    assert max(steps) <= 1e-6 * history[0], max(steps)
    assert history[-1] < 0.6 * history[0], (history[0], history[-1])
    optimum = sum(float(torch.linalg.svdvals(w.double())[2:].square().sum().sqrt()) for w in weights)
    assert history[-1] >= optimum
    final = float((weights - lora_B @ lora_A).norm(dim=(1, 2)).sum())
    assert 0.99 * history[-1] <= final <= history[-1]


def test_inilora_starts_at_the_base_model(trained):
    run, _, _ = trained("inilora")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step0_base_loss"] == pytest.approx(metrics["step0_init_loss"], rel=1e-5, abs=1e-5)
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["init_iters"] == 10 and config["alpha"] == 2 * RANK


def test_inilora_fit_is_cached(tiny_model_dir, qa_file, tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("LORASB_HOME", str(home))
    train.train(_config(tiny_model_dir, qa_file, tmp_path / "first", "inilora"))
    cached = sorted((home / "inilora").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".safetensors"
    first = _start_parts(tmp_path / "first")

    # Change the cached fit (B0 doubled): a second run must read it, not fit again nor write another file.
    fits = load_file(cached[0])
    doubled = {k: (2 * t if k.endswith(".lora_B") else t) for k, t in fits.items()}
    save_file(doubled, cached[0])
    stamp = cached[0].stat().st_mtime_ns
    train.train(_config(tiny_model_dir, qa_file, tmp_path / "second", "inilora"))
    assert sorted((home / "inilora").iterdir()) == cached and cached[0].stat().st_mtime_ns == stamp
    second = _start_parts(tmp_path / "second")
    assert second.keys() == first.keys()
    for module, (start_B, start_A, _) in first.items():
        torch.testing.assert_close(second[module][0], 2 * start_B)
        torch.testing.assert_close(second[module][1], start_A)


# -------------------------------------------------------------------------------------------- step-0 losses


@pytest.mark.parametrize("method", [*PEFT_METHODS, "inilora-alpha", "inilora-beta", "full"])
def test_every_method_but_lorasb_starts_at_the_base_loss(method, trained):
    _, summary, _ = trained(method)
    assert summary.step0_base_loss is not None and summary.step0_base_loss > 0
    assert summary.step0_init_loss == pytest.approx(summary.step0_base_loss, rel=1e-5)


def test_lorasb_starts_one_simulated_step_ahead(tiny_model_dir, qa_file, factors_file, tmp_path):
    summary = train.train(
        _config(tiny_model_dir, qa_file, tmp_path / "run", "lorasb", rank=None, factors=str(factors_file))
    )
    assert summary.step0_init_loss < summary.step0_base_loss * (1 - 1e-4)


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"method": "lorra"}, "unknown --method 'lorra'"),
        ({"method": "lora", "rank": None}, "--method lora needs --rank"),
        ({"method": "lora", "factors": "FACTORS"}, "--factors is for --method lorasb, not lora"),
        ({"method": "lorasb", "rank": None}, "--method lorasb trains between the factors"),
        ({"method": "lora", "init_scale": 2.0}, "--init-scale applies to --method lorasb only"),
        ({"method": "head", "rank": None}, "--method head trains a classifier's head"),
        # A method refuses the options it does not take, and names the methods that do.
        ({"method": "lorasb", "factors": "FACTORS", "targets": "attention"}, "--targets applies to --method lora, "),
        ({"method": "lora", "init_iters": 5}, "--init-iters applies to --method inilora, inilora-alpha, inilora-beta"),
        ({"method": "full", "alpha": 4.0}, "--alpha applies to --method lora, "),
        ({"method": "loraga", "init_samples": 0}, "--init-samples 0 must be a finite number ≥ 1"),
    ],
)
def test_bad_method_options(tiny_model_dir, qa_file, factors_file, tmp_path, overrides, pattern):
    overrides = {k: str(factors_file) if v == "FACTORS" else v for k, v in overrides.items()}
    method = overrides.pop("method")
    with pytest.raises(BadInputError, match=pattern) as excinfo:
        train.train(_config(tiny_model_dir, qa_file, tmp_path / "run", method, **overrides))
    if method == "lorra":
        assert excinfo.value.hint == did_you_mean("lorra", sorted(methods.METHODS))
        assert "did you mean 'lora'" in str(excinfo.value)
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


# ---------------------------------------------------------------------------------------------------- resume


def test_peft_method_resumes_to_the_uninterrupted_adapter(tiny_model_dir, qa_file, tmp_path):
    import shutil

    settings = {"max_steps": 4, "save_steps": 2}
    run = tmp_path / "run"
    train.train(_config(tiny_model_dir, qa_file, run, "lora", **settings))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    full = load_file(run / "adapter.safetensors")
    # As if it had stopped between steps 2 and 4:
    (run / "adapter.safetensors").unlink()
    shutil.rmtree(run / "checkpoint-4")

    class Steps(TrainerCallback):
        def __init__(self):
            self.seen: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(state.global_step)

    steps = Steps()
    summary = train.train(
        _config(tiny_model_dir, qa_file, run, "lora", resume=True, overwrite=False, **settings), callbacks=[steps]
    )
    assert summary.steps == 4 and steps.seen == [3, 4]  # it continued from checkpoint-2
    resumed = load_file(run / "adapter.safetensors")
    assert set(full) == set(resumed)
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_the_adapter_records_the_options_the_method_resolved(trained):
    run, _, _ = trained("lora")
    recorded = json.loads((run / adapter.CONFIG_FILE).read_text())["train"]
    assert recorded["rank"] == RANK and recorded["targets"] == "all-linear" and recorded["alpha"] is None
    assert "init_scale" not in recorded and "init_iters" not in recorded  # options of other methods


def test_layer_tensors_must_be_those_the_recorded_methods_variant_reads():
    model = nn.Sequential(nn.Linear(4, 3))
    factors = {"0": (torch.zeros(3, 2), torch.eye(2), torch.zeros(2, 4))}
    with pytest.raises(IncompatibleArtifactError, match="does not read: lora_magnitude"):
        adapter.inject(model, factors, tensors={"0": {"lora_magnitude": torch.ones(3)}})
    with pytest.raises(IncompatibleArtifactError, match="lacks its layers' tensors lora_magnitude"):
        adapter.inject(model, factors, variant=methods.layer_variant("dora"))
