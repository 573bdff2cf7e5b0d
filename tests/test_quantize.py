"""--quantize nf4|fp4|int8 (bitsandbytes on the CPU): the chain on a quantized base, what it records, and merge into
the original weights; the loader's refusals."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from helpers import QA_ROWS, make_llama, save_model, train_config, write_jsonl
from safetensors import safe_open

from lorasb_cli import adapter, artifacts, cli, estimate, evaluate, models, plan, train
from lorasb_cli.decompose import DecomposeConfig, decompose

pytest.importorskip("bitsandbytes", reason="--quantize needs bitsandbytes (pip install 'lorasb[quant]')")


def run(args: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A tiny Llama saved in bfloat16 (loaded in float32 on the CPU, as --dtype auto does)."""
    model, tokenizer = make_llama(hidden=64, layers=2, dtype=torch.bfloat16)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("llama-bf16"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", QA_ROWS)


def _weight(folder, name: str) -> torch.Tensor:
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            if name in set(f.keys()):
                return f.get_tensor(name)
    raise KeyError(name)


def test_nf4_chain_records_its_base_and_merges_into_the_original_weights(bf16_dir, data_file, tmp_path, capsys):
    """estimate → decompose → train → merge → evaluate on an nf4 base: the update mostly agrees in sign with the
    float32 base's, every artifact records nf4, R trains in float32, and merge folds B·R·A into the original bf16
    weights (not the nf4 ones) and says so."""
    updates = {}
    for quantize in (None, "nf4"):
        out = tmp_path / f"u-{quantize}.safetensors"
        estimate.estimate(
            estimate.EstimateConfig(
                model=str(bf16_dir), data=str(data_file), out=str(out), samples=12, quantize=quantize
            )
        )
        updates[quantize] = artifacts.Artifact(out, kinds=("update",))
    agree = [
        (updates["nf4"].get(name).float() == updates[None].get(name).float()).float().mean().item()
        for name in updates[None].names
    ]
    fraction = sum(agree) / len(agree)
    assert fraction > 0.9  # measured 0.948 (fp4 0.932, int8 0.996)
    assert updates["nf4"].meta.base_model.quantization == "nf4"
    assert "quantization" not in updates[None].fields["base_model"]  # unquantized files are as before

    factors = tmp_path / "f.safetensors"
    decompose(DecomposeConfig.from_options(update=str(tmp_path / "u-nf4.safetensors"), rank=4, out=str(factors)))
    assert artifacts.Artifact(factors, kinds=("factors",)).meta.base_model.quantization == "nf4"

    run_dir = tmp_path / "run"
    train.train(train_config(bf16_dir, data_file, run_dir, factors=factors, quantize="nf4", max_steps=4))
    saved = adapter.load_adapter(run_dir)
    assert saved.meta.base_model.quantization == "nf4"
    assert saved.meta.train["quantize"] == "nf4"
    with safe_open(run_dir / adapter.ADAPTER_FILE, framework="pt") as f:
        assert {f.get_tensor(n).dtype for n in list(f.keys())} == {torch.float32}
    start = artifacts.load_factors(factors)
    assert any(not torch.equal(saved.factors[m][1], start.factors[m][1]) for m in start.factors)  # R trained

    merged = tmp_path / "merged"
    status, _, err = run(["merge", "-a", run_dir, "-o", merged], capsys)
    assert status == 0, err
    assert "quantized as nf4" in err and "original unquantized weights" in err
    quantized_base, _ = models.load_model(
        models.resolve_model(str(bf16_dir)), device=torch.device("cpu"), dtype=torch.float32, quantize="nf4"
    )
    for module, (lora_B, lora_R, lora_A) in saved.factors.items():
        w0 = _weight(bf16_dir, f"{module}.weight")
        got = _weight(merged, f"{module}.weight")
        assert got.dtype == torch.bfloat16 == w0.dtype
        expected = (w0.float() + lora_B @ lora_R @ lora_A).to(torch.bfloat16)
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=0)  # at most one bf16 rounding apart
        # ... and not the nf4 weights: those are far from W0
        layer = quantized_base.get_submodule(module)
        dense = layer(torch.eye(layer.in_features)).T  # x·Wᵀ at x = I: the dequantized W
        assert (dense - w0.float()).abs().max() > 10 * (got.float() - expected.float()).abs().max()
    with safe_open(next(merged.glob("*.safetensors")), framework="pt") as f:
        provenance = json.loads(f.metadata()[artifacts.METADATA_KEY])
    assert provenance["merged_from"]["base_model"]["quantization"] == "nf4"

    losses = {}
    for quantize in (None, "nf4"):
        results = evaluate.evaluate(
            evaluate.EvaluateConfig(
                model=str(bf16_dir),
                adapter=str(run_dir),
                task="perplexity",
                data=str(data_file),
                quantize=quantize,
                out=str(tmp_path / f"r-{quantize}.json"),
            )
        )
        losses[quantize] = results.metrics["loss"]
    assert losses["nf4"] != losses[None]  # --quantize evaluates on the quantized base
    assert abs(losses["nf4"] - losses[None]) < 0.5


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_quantized_linears_keep_their_shapes_for_hooks_adapters_and_plans(tiny_model_dir, kind):
    """A quantized weight is packed ([m·n/2, 1] bytes in 4 bits): the hooks, the adapter layers and the fingerprint
    take (m, n) from the module's out/in features, and the plan's bytes are what bitsandbytes holds."""
    ref = models.resolve_model(str(tiny_model_dir))
    dense, _ = models.load_model(ref, device=torch.device("cpu"), dtype=torch.float32)
    model, _ = models.load_model(ref, device=torch.device("cpu"), dtype=torch.float32, quantize=kind)
    modules = models.resolve_targets(model, "all-linear")
    shapes = models.target_shapes(dense, modules)
    assert models.target_shapes(model, modules) == shapes
    assert models.parameter_count(model) == models.parameter_count(dense)
    if kind != "int8":
        assert tuple(model.get_submodule(modules[0]).weight.shape) != shapes[modules[0]]  # packed
    hooks = estimate._GradientHooks(model, modules)
    hooks.remove()  # no gradient arrived: zero accumulators of the module's own shape
    assert {name: tuple(g.shape) for name, g in hooks.sums.items()} == shapes
    # The plan's weight bytes: packed weights and their quantization state, as loaded (the 16-entry codebooks aside).
    held = set()
    loaded = 0
    for module in model.modules():
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if id(tensor) not in held:
                held.add(id(tensor))
                loaded += tensor.untyped_storage().nbytes()
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        scales = getattr(getattr(module, "weight", None), "SCB", None)
        loaded += state.absmax.untyped_storage().nbytes() if state is not None else 0
        loaded += scales.untyped_storage().nbytes() if scales is not None else 0
    facts = plan.model_facts(ref, batch_size=1, max_length=8, dtype=torch.float32, quantize=kind, train=False)
    assert facts.weight_bytes == loaded
    factors = {name: (torch.randn(m, 2), torch.randn(2, 2), torch.randn(2, n)) for name, (m, n) in shapes.items()}
    layers = adapter.inject(model, factors)
    assert {layer.lora_R.dtype for layer in layers.values()} == {torch.float32}
    assert model(input_ids=torch.tensor([[1, 5, 9]])).logits.isfinite().all()


def test_missing_bitsandbytes_is_one_line_exit_2(tiny_model_dir, qa_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    status, out, err = run(
        ["estimate", "-q", "-m", tiny_model_dir, "-d", qa_file, "--quantize", "nf4", "-o", tmp_path / "u.safetensors"],
        capsys,
    )
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "--quantize nf4 needs bitsandbytes" in err and "pip install 'lorasb[quant]'" in err
    assert not (tmp_path / "u.safetensors").exists()


def test_what_a_quantized_base_or_fsdp_cannot_run_is_refused(tiny_model_dir, qa_file, tmp_path, capsys):
    status, _, err = run(
        ["train", "-m", tiny_model_dir, "-d", qa_file, "--method", "full", "--quantize", "nf4", "-o", tmp_path / "r"],
        capsys,
    )
    assert status == 2 and "--method full reads or trains the base weights W0" in err and "lorasb" in err
    fsdp = ["--strategy", "fsdp", "--quantize", "nf4"]
    status, _, err = run(["estimate", "-m", tiny_model_dir, "-d", qa_file, *fsdp], capsys)
    assert status == 2 and "--strategy fsdp with --quantize nf4 is not supported" in err and "--strategy ddp" in err


# Where the CPU has AVX512-BF16, importing bitsandbytes asks the hub for a faster kernel; offline that prints two
# lines. Replayed on any CPU: the backend module is re-run with the capability check answering yes.
_HUB_LOOKUP = """
import importlib, sys, warnings
if sys.argv[1] == "lorasb":
    import lorasb_cli
import bitsandbytes.functional
import bitsandbytes.backends.cpu.ops as ops
bitsandbytes.functional.has_avx512bf16 = lambda: True
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # torch's note that the re-run registers its kernels again
    importlib.reload(ops)
"""


def test_bitsandbytes_hub_lookup_is_silent_offline():
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    plain, quiet = (
        subprocess.run([sys.executable, "-c", _HUB_LOOKUP, who], capture_output=True, text=True, env=env, check=True)
        for who in ("plain", "lorasb")
    )
    assert "Skipping publisher trust check" in plain.stderr and "Failed to load CPU gemm_4bit" in plain.stderr
    assert quiet.stderr == ""
