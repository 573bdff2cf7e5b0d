"""lorasb_cli.plan: the memory plan against real models and real autograd, the fit check, `estimate --dry-run`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_llama
from test_mistral import MISTRAL_7B

from lorasb_cli import adapter, cli, estimate, held_inputs, models, plan
from lorasb_cli.errors import BadInputError


def _config_only(model, folder):
    """A folder with only the model's config.json: what `plan` needs, no weights."""
    model.config.save_pretrained(folder)
    return models.resolve_model(str(folder))


def test_accumulator_and_weight_bytes_are_those_of_the_real_model(tmp_path):
    model, _ = make_llama(hidden=64, layers=2)
    facts = plan.model_facts(_config_only(model, tmp_path), batch_size=2, max_length=16, dtype=torch.float32)
    named = dict(model.named_modules())
    targets = models.resolve_targets(model, "all-linear")
    assert facts.targets == models.target_shapes(model, targets)
    entries = sum(named[t].weight.numel() for t in targets)
    assert plan.accumulator_bytes(facts.targets) == 4 * entries
    assert plan.accumulator_bytes(facts.targets, torch.bfloat16) == 2 * entries
    # Tied embeddings counted once; buffers (rotary inverse frequencies) are part of what is loaded.
    assert facts.weight_bytes == sum(t.numel() * 4 for t in (*model.parameters(), *model.buffers()))
    accumulators = next(i for i in plan.estimate_plan(facts).items if i.what.startswith("accumulators"))
    assert accumulators.bytes == 4 * entries and accumulators.where == "cpu"
    # estimate --report-ranks sums the two halves of the sample apart
    halves = dataclasses.replace(facts, accumulator_sets=2)
    accumulators = next(i for i in plan.estimate_plan(halves).items if i.what.startswith("accumulators"))
    assert accumulators.bytes == 8 * entries and "2 halves" in accumulators.what


def test_mistral_7b_accumulators_from_its_config_alone(tmp_path):
    """docs/design.md §5: about 28 GB of float32 accumulators for Mistral-7B's all-linear targets."""
    from transformers import MistralConfig

    MistralConfig(**MISTRAL_7B).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    facts = plan.model_facts(
        models.resolve_model(str(tmp_path)), batch_size=1, max_length=8, dtype=torch.bfloat16, train=False
    )
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096  # q, o; k, v; gate, up, down
    assert facts.target_entries == 32 * per_layer == 6_979_321_856
    assert plan.accumulator_bytes(facts.targets) == 27_917_287_424
    # + two norms per layer, the final norm, embeddings and LM head (untied), two rotary buffers of 64 entries.
    assert facts.weight_bytes == 2 * (32 * (per_layer + 2 * 4096) + 4096 + 2 * 32000 * 4096 + 2 * 64)


def _real_saved_bytes(model, batch, *, track_held: bool, monkeypatch) -> int:
    """Bytes of the distinct storages autograd saves (and the hooks hold) in one real CPU forward of
    `estimate.sum_gradients`' hooks (or of a LoRA-SB model): the independent reference of the meta trace."""
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, torch.Tensor] = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    if track_held:
        real_held_input = held_inputs.held_input

        def recording(x):
            source, rebuilt = real_held_input(x)
            if not rebuilt:
                keep(x)
            return source, rebuilt

        monkeypatch.setattr(held_inputs, "held_input", recording)
        hooks = estimate._GradientHooks(model, models.resolve_targets(model, "all-linear"))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        logits = model(input_ids=batch, use_cache=False).logits
    if track_held:
        hooks.remove()
    del logits
    return sum(t.untyped_storage().nbytes() for t in kept.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_trace_equals_what_a_real_forward_keeps(tmp_path, monkeypatch, dtype):
    model, _ = make_llama(hidden=64, layers=2, dtype=dtype)
    model.requires_grad_(False)
    facts = plan.model_facts(_config_only(model, tmp_path), batch_size=3, max_length=20, rank=4, dtype=dtype)
    batch = torch.randint(0, model.config.vocab_size, (3, 20))

    real_estimate = _real_saved_bytes(model, batch, track_held=True, monkeypatch=monkeypatch)
    assert facts.estimate_activations == real_estimate
    assert facts.logits_entries == 3 * 20 * model.config.vocab_size

    monkeypatch.undo()
    shapes = models.target_shapes(model, models.resolve_targets(model, "all-linear"))
    factors = {n: (torch.randn(m, 4), torch.randn(4, 4), torch.randn(4, k)) for n, (m, k) in shapes.items()}
    adapter.inject(model, factors)
    model.train()
    assert facts.train_activations == _real_saved_bytes(model, batch, track_held=False, monkeypatch=monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rebuilt_target_inputs_are_bit_for_bit_the_forwards(dtype):
    """RMSNorm's output (q/k/v, gate/up) and SwiGLU's product (down_proj) are rebuilt, o_proj's input is held."""
    model, _ = make_llama(hidden=64, layers=2, dtype=dtype)
    model.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    seen = {}

    def check(name):
        def hook(_module, inputs, _output):
            recipe = held_inputs.recomputable(inputs[0])
            seen[name.rsplit(".", 1)[1]] = recipe is not None and torch.equal(recipe(), inputs[0])

        return hook

    for name in models.resolve_targets(model, "all-linear"):
        model.get_submodule(name).register_forward_hook(check(name))
    model(input_ids=torch.randint(0, model.config.vocab_size, (2, 12)))
    assert seen == {
        "q_proj": True,
        "k_proj": True,
        "v_proj": True,
        "o_proj": False,
        "gate_proj": True,
        "up_proj": True,
        "down_proj": True,
    }


def test_rebuild_refuses_what_it_cannot_know():
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    product = a * b
    source, rebuilt = held_inputs.held_input(product)
    assert rebuilt and torch.equal(source(), product) and source().data_ptr() != product.data_ptr()
    # w·c.to(float16) with w float32: the product is float32 whatever c was cast to, so the cast's dtype is not
    # known from the graph — held, not rebuilt (rebuilding with a float32 cast would change the bits).
    w = torch.randn(8)
    mixed = w * (a * b).to(torch.float16)
    assert mixed.dtype == torch.float32 and held_inputs.recomputable(mixed) is None
    source, rebuilt = held_inputs.held_input(mixed)
    assert not rebuilt and source().data_ptr() == mixed.data_ptr()
    # A product with an operand autograd does not save (and cannot rebuild): held.
    assert (
        held_inputs.recomputable(torch.exp(a) * 2.0) is None
        and held_inputs.recomputable(a.sin() * a.cos().detach()) is None
    )


def _estimate_config(tiny_model_dir, qa_file, tmp_path, **overrides):
    settings = {"samples": 8, "batch_size": 4, "max_length": 64}
    return estimate.EstimateConfig(
        model=str(tiny_model_dir), data=str(qa_file), out=str(tmp_path / "u.safetensors"), **settings | overrides
    )


def test_estimate_refuses_before_loading_when_memory_is_short(tiny_model_dir, qa_file, tmp_path, monkeypatch):
    facts = plan.model_facts(
        models.resolve_model(str(tiny_model_dir)), batch_size=4, max_length=64, dtype=torch.float32, train=False
    )
    need32 = plan.estimate_plan(facts).total
    need16 = plan.estimate_plan(facts, accumulate_dtype=torch.bfloat16).total
    assert need16 < need32

    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr(plan, "available_memory", lambda places: {"cpu": (need16 + need32) // 2})
    with pytest.raises(BadInputError) as e:
        estimate.estimate(_estimate_config(tiny_model_dir, qa_file, tmp_path))
    line = e.value.one_line()
    assert line.startswith("estimate needs ") and "on cpu but" in line and "\n" not in line
    assert line.endswith("these fit: --accumulate-on cpu --accumulate-dtype bfloat16")

    monkeypatch.setattr(plan, "available_memory", lambda places: {"cpu": need16 // 2})
    with pytest.raises(BadInputError, match="no accumulator placement fits: lower --batch-size"):
        estimate.estimate(_estimate_config(tiny_model_dir, qa_file, tmp_path, accumulate_dtype="bfloat16"))
    assert not (tmp_path / "u.safetensors").exists()


def test_cli_memory_error_is_one_line_exit_2(tiny_model_dir, qa_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plan, "available_memory", lambda places: {"cpu": 1024})
    with pytest.raises(SystemExit) as e:
        cli.main(
            [
                "estimate",
                "-m",
                str(tiny_model_dir),
                "-d",
                str(qa_file),
                "--samples",
                "4",
                "-q",
                "-o",
                str(tmp_path / "u.safetensors"),
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith("Error: estimate needs ") and err.count("\n") == 1


def test_estimate_reports_where_it_accumulated(tiny_model_dir, qa_file, tmp_path):
    # 64 tokens hold no answer token after the Alpaca prompt of the tiny tokenizer: nothing to estimate from.
    config = _estimate_config(tiny_model_dir, qa_file, tmp_path, accumulate_on="device", max_length=256)
    summary = estimate.estimate(config)
    # On a CPU run "device" is the CPU; the plan's need is reported beside the measured peak.
    assert summary.accumulate_on == "cpu" and summary.accumulate_dtype == "float32"
    assert set(summary.planned_bytes) == {"cpu"} and summary.planned_bytes["cpu"] > 0


def test_dry_run_reads_only_the_config(tmp_path, capsys):
    model, _ = make_llama(hidden=64, layers=2)
    model.config.save_pretrained(tmp_path)  # no weights, no tokenizer
    args = [
        "estimate",
        "-m",
        str(tmp_path),
        "--dry-run",
        "--batch-size",
        "2",
        "--max-length",
        "32",
        "--rank",
        "4",
        "--dtype",
        "float32",
    ]
    with pytest.raises(SystemExit) as e:
        cli.main([*args, "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    plan_json = json.loads(out)
    assert set(plan_json["stages"]) == {"estimate", "train", "merge"}
    entries = sum(m * n for m, n in models.target_shapes(model, models.resolve_targets(model, "all-linear")).values())
    assert plan_json["model"]["target_entries"] == entries
    items = {i["what"]: i["bytes"] for i in plan_json["stages"]["estimate"]["items"]}
    assert items["accumulators (float32, 14 targets)"] == 4 * entries
    assert plan_json["stages"]["estimate"]["fits"] is True

    with pytest.raises(SystemExit) as e:
        cli.main(args)
    out, err = capsys.readouterr()
    assert e.value.code == 0
    assert out.count("\n") == 1 and out.startswith("estimate ") and "train " in out and "merge " in out
    assert "memory plan" in err and "accumulators" in err

    with pytest.raises(SystemExit) as e:
        cli.main(["estimate", "-m", str(tmp_path)])  # without --dry-run, --data is needed
    assert e.value.code == 2 and "Missing option '--data'" in capsys.readouterr().err


def test_plan_of_estimate_is_below_a_lorasb_step_on_llama_shapes(tmp_path):
    """docs/design.md §4 in the plan: at the same batch, estimate without its accumulators holds less than a LoRA-SB
    training step (the accumulators are the price of G; --accumulate-on cpu keeps them off the device)."""
    model, _ = make_llama(hidden=128, layers=2)
    facts = plan.model_facts(_config_only(model, tmp_path), batch_size=4, max_length=64, rank=8, dtype=torch.float32)
    est = {i.what.split(" (")[0]: i.bytes for i in plan.estimate_plan(facts).items}
    step = plan.train_plan(facts)
    assert est["weights"] + est["activations"] + est["loss: logits, their gradient, float32 chunks"] < step.total


def test_plan_inputs_are_checked():
    facts = plan.ModelFacts(
        model="m",
        dtype="float32",
        parameters=1,
        weight_bytes=1,
        targets={"a": (2, 2)},
        batch_size=1,
        max_length=1,
        rank=1,
        estimate_activations=0,
        train_activations=0,
        logits_entries=0,
        largest_shard_bytes=0,
        shard_source="",
    )
    with pytest.raises(BadInputError, match="unknown --accumulate-on 'gpu'"):
        plan.choose_accumulation(
            facts, device="cpu", accumulate_on="gpu", accumulate_dtype=torch.float32, free={"cpu": 10**9}
        )
    with pytest.raises(BadInputError, match="unknown --accumulate-dtype 'fp8'"):
        plan.accumulate_dtype_of("fp8")
    # auto on an accelerator: the device when all of estimate fits there, else the CPU.
    assert (
        plan.resolve_accumulate_on(
            facts,
            device="cuda:0",
            accumulate_on="auto",
            accumulate_dtype=torch.float32,
            free={"cpu": 10**9, "cuda:0": 10**9},
        )
        == "device"
    )
    assert (
        plan.resolve_accumulate_on(
            facts,
            device="cuda:0",
            accumulate_on="auto",
            accumulate_dtype=torch.float32,
            free={"cpu": 10**9, "cuda:0": 10},
        )
        == "cpu"
    )
    assert (
        plan.resolve_accumulate_on(
            facts, device="cpu", accumulate_on="auto", accumulate_dtype=torch.float32, free={"cpu": 10**9}
        )
        == "cpu"
    )


# --- benchmarks.gpu: ready for the minutes a GPU is lent ----------------------------------------------------

# Run as a user runs it: `python -m benchmarks.gpu` from the repository root.
REPO = Path(__file__).resolve().parent.parent
GPU_MODULE = [sys.executable, "-m", "benchmarks.gpu"]


def test_gpu_benchmark_without_cuda_exits_at_once_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run(GPU_MODULE, check=False, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("benchmarks.gpu: no CUDA device here")
    assert "python -m benchmarks.gpu --shape tiny --device cpu" in done.stderr


def test_gpu_benchmark_runs_its_code_paths_on_cpu_with_a_tiny_shape():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        *GPU_MODULE,
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--no-write",
        "--samples",
        "4",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--lorasb-rank",
        "8",
        "--lora-rank",
        "4",
        "--steps",
        "1",
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert out.startswith("# 7B-shaped figures on CPU")
    for phase in (
        "estimate: 4 samples × 16 tokens",
        "decompose: truncated SVD of 14 updates at r=8",
        "train step: LoRA-SB r=8",
        "train step: limit (no adapter, every weight frozen)",
        "train step: PEFT LoRA r=4",
    ):
        assert phase in out
    assert "| LoRA-SB step / limit |" in out and "| PEFT LoRA step / limit |" in out
    # LoRA-SB trains r² per target, PEFT LoRA r·(m + n): the trainable counts of the 2 × 7 targets are exact.
    shapes = {
        "q": (128, 128),
        "k": (64, 128),
        "v": (64, 128),
        "o": (128, 128),
        "gate": (448, 128),
        "up": (448, 128),
        "down": (128, 448),
    }
    lora = 2 * sum(4 * (m + n) for m, n in shapes.values())
    assert f"| trainable parameters | {2 * 7 * 64:,} / {lora:,} =" in out


# --- the trace is cached under $LORASB_HOME (issue 31 item 3) -------------------------------------------------


def test_the_trace_is_cached_per_config_and_traced_again_when_the_config_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASB_HOME", str(tmp_path / "home"))
    traced = []
    trace = plan._trace
    monkeypatch.setattr(plan, "_trace", lambda *a: traced.append(a) or trace(*a))
    model, _ = make_llama(hidden=64, layers=2)
    first = plan.model_facts(_config_only(model, tmp_path / "a"), batch_size=2, max_length=16, dtype=torch.float32)
    # The same config in another folder (another machine's path): no second trace, the same facts but the id.
    again = plan.model_facts(_config_only(model, tmp_path / "b"), batch_size=2, max_length=16, dtype=torch.float32)
    assert len(traced) == 1 and len(list((tmp_path / "home" / "plans").iterdir())) == 1
    assert dataclasses.replace(again, model=first.model) == first
    # Another length is another trace; so is another config.
    longer = plan.model_facts(_config_only(model, tmp_path / "a"), batch_size=2, max_length=32, dtype=torch.float32)
    assert len(traced) == 2 and longer.estimate_activations > first.estimate_activations
    three_layers, _ = make_llama(hidden=64, layers=3)
    deeper = plan.model_facts(
        _config_only(three_layers, tmp_path / "c"), batch_size=2, max_length=16, dtype=torch.float32
    )
    assert len(traced) == 3 and len(deeper.targets) == len(first.targets) * 3 // 2


def test_a_damaged_cache_entry_is_traced_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASB_HOME", str(tmp_path / "home"))
    model, _ = make_llama(hidden=64, layers=2)
    ref = _config_only(model, tmp_path / "a")
    first = plan.model_facts(ref, batch_size=2, max_length=16, dtype=torch.float32)
    (entry,) = (tmp_path / "home" / "plans").iterdir()
    entry.write_text("{")
    assert plan.model_facts(ref, batch_size=2, max_length=16, dtype=torch.float32) == first
    assert json.loads(entry.read_text())["parameters"] == first.parameters
