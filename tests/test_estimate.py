"""estimate/combine: hook-accumulated G against torch.autograd, batch-size and sharding invariance."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import QA_ROWS, make_llama

from lorasb_cli import artifacts, data, estimate, models
from lorasb_cli.errors import IncompatibleArtifactError, NonFiniteError
from lorasb_cli.loss import per_sample_loss_sum


def _examples(tokenizer, rows=QA_ROWS, max_length=256):
    return data.encode(rows, "prompt-response", tokenizer, max_length)


def _autograd_reference(model, modules, examples) -> dict[str, torch.Tensor]:
    """Σ_i ∇_W L_i with plain autograd, one sample at a time (no hooks, no batching)."""
    named = dict(model.named_modules())
    weights = {name: named[name].weight for name in modules}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    for batch in data.make_batches(examples, 1, pad_id=0):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = per_sample_loss_sum(logits, batch["labels"])
        loss.backward()
    grads = {name: w.grad.detach().clone() for name, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    return grads


def test_hook_gradients_equal_autograd():
    model, tokenizer = make_llama()
    modules = models.resolve_targets(model, "all-linear")
    examples = _examples(tokenizer)
    reference = _autograd_reference(model, modules, examples)
    result = estimate.sum_gradients(model, modules, data.make_batches(examples, 5, tokenizer.pad_token_id))

    assert result.samples == len(QA_ROWS)
    assert result.tokens == sum(data.supervised_tokens(e) for e in examples)
    assert set(result.sums) == set(reference) and len(modules) == 14
    for name, g in result.sums.items():
        torch.testing.assert_close(g, reference[name], rtol=1e-4, atol=1e-6)
        assert g.abs().max() > 0
    # Signs agree wherever the reference is not within float noise of zero.
    for name, g in result.sums.items():
        ref = reference[name]
        clear = ref.abs() > 1e-6 * ref.abs().max()
        assert torch.equal(torch.sign(g)[clear], torch.sign(ref)[clear])


def test_no_weight_ever_requires_grad_and_no_grads_are_kept():
    model, tokenizer = make_llama()
    modules = models.resolve_targets(model, "all-linear")
    seen = []
    model.model.layers[1].register_forward_hook(
        lambda *_: seen.append(any(p.requires_grad for p in model.parameters()))
    )
    estimate.sum_gradients(model, modules, data.make_batches(_examples(tokenizer), 4, tokenizer.pad_token_id))
    assert seen and not any(seen)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    # Hooks are removed: a later forward is a plain inference forward.
    out = model(input_ids=torch.tensor([[1, 5, 6]])).logits
    assert not out.requires_grad


def test_per_sample_loss_ignores_padding_and_counts_unsupervised_as_zero():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, 3, data.IGNORE], [data.IGNORE, data.IGNORE, data.IGNORE, data.IGNORE]])
    loss, tokens = per_sample_loss_sum(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[0, :2], labels[0, 1:3])
    torch.testing.assert_close(loss, expected)
    assert tokens == 2


def test_sign_update_is_minus_sign_of_g():
    g = torch.tensor([[0.5, -2.0], [0.0, 1e-30]])
    ((name, update),) = estimate.sign_update({"m": g}).items()
    assert name == "m.weight" and update.dtype == torch.int8
    assert update.tolist() == [[-1, 1], [0, -1]]


def test_non_finite_gradient_names_the_module():
    model, tokenizer = make_llama()
    model.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("inf")
    modules = models.resolve_targets(model, "all-linear")
    with pytest.raises(NonFiniteError) as excinfo:
        estimate.sum_gradients(model, modules, data.make_batches(_examples(tokenizer), 4, tokenizer.pad_token_id))
    assert re.fullmatch(
        r"NaN/Inf in the gradient of model\.layers\.\d\.\S+ — run with --dtype float32.*", excinfo.value.one_line()
    )


def _run(model_dir, qa_file, out, **overrides):
    config = estimate.EstimateConfig(
        model=str(model_dir), data=str(qa_file), out=str(out), samples=8, dtype="float64", **overrides
    )
    return estimate.estimate(config)


def test_update_does_not_depend_on_batch_size(tiny_model_dir, qa_file, tmp_path):
    _run(tiny_model_dir, qa_file, tmp_path / "b1.safetensors", batch_size=1)
    _run(tiny_model_dir, qa_file, tmp_path / "b8.safetensors", batch_size=8)
    one, eight = (artifacts.Artifact(tmp_path / f, kinds=("update",)) for f in ("b1.safetensors", "b8.safetensors"))
    assert one.names == eight.names
    for name in one.names:
        assert torch.equal(one.get(name), eight.get(name)), name


def test_two_raw_shards_combined_equal_the_single_estimate(tiny_model_dir, qa_file, tmp_path):
    single = tmp_path / "single.safetensors"
    _run(tiny_model_dir, qa_file, single)
    parts = []
    for i in range(2):
        parts.append(str(tmp_path / f"part{i}.safetensors"))
        summary = _run(tiny_model_dir, qa_file, parts[-1], raw=True, shard=f"{i}/2")
        assert summary.samples == 4
    raw = artifacts.Artifact(parts[0], kinds=("update-raw",))
    assert raw.get(raw.names[0]).dtype == torch.float32 and raw.fields["samples"] == 4

    combined = estimate.combine(estimate.CombineConfig(parts=parts, out=str(tmp_path / "combined.safetensors")))
    a, b = artifacts.Artifact(single), artifacts.Artifact(combined)
    assert b.fields["samples"] == 8 and b.fields["kind"] == "update"
    for name in a.names:
        assert torch.equal(a.get(name), b.get(name)), name


def test_combine_refuses_mismatched_or_incomplete_shards(tiny_model_dir, qa_file, tmp_path):
    p0 = str(tmp_path / "p0.safetensors")
    p1_other_seed = str(tmp_path / "p1.safetensors")
    _run(tiny_model_dir, qa_file, p0, raw=True, shard="0/2")
    _run(tiny_model_dir, qa_file, p1_other_seed, raw=True, shard="1/2", seed=3)
    with pytest.raises(IncompatibleArtifactError, match="different samplings"):
        estimate.combine(estimate.CombineConfig(parts=[p0, p1_other_seed], out=str(tmp_path / "x.safetensors")))
    with pytest.raises(IncompatibleArtifactError, match=r"missing shard\(s\) 1/2"):
        estimate.combine(estimate.CombineConfig(parts=[p0], out=str(tmp_path / "x.safetensors")))
    with pytest.raises(IncompatibleArtifactError, match="given twice"):
        estimate.combine(estimate.CombineConfig(parts=[p0, p0], out=str(tmp_path / "x.safetensors")))
    p_targets = str(tmp_path / "pt.safetensors")
    _run(tiny_model_dir, qa_file, p_targets, raw=True, shard="1/2", targets="attention")
    with pytest.raises(IncompatibleArtifactError, match="differ in base model"):
        estimate.combine(estimate.CombineConfig(parts=[p0, p_targets], out=str(tmp_path / "x.safetensors")))
    assert not (tmp_path / "x.safetensors").exists()


def test_provenance_of_the_update(tiny_model_dir, qa_file, tmp_path):
    _run(tiny_model_dir, qa_file, tmp_path / "u.safetensors", eta=3e-5, seed=7)
    meta = artifacts.Artifact(tmp_path / "u.safetensors").fields
    assert meta["kind"] == "update" and meta["format"] == "lorasb" and meta["format_version"] == 1
    assert meta["eta"] == 3e-5 and meta["seed"] == 7 and meta["samples"] == 8
    assert meta["base_model"]["id"] == str(tiny_model_dir.resolve())
    assert len(meta["base_model"]["fingerprint"]) == 16
    assert meta["data"]["format"] == "prompt-response" and meta["data"]["rows"] == len(QA_ROWS)
    assert {"lorasb", "torch", "transformers", "safetensors"} <= set(meta["versions"])


def _torchrun_estimate(model_dir, qa_file, out, port: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    cmd += ["-m", "lorasb_cli", "estimate", "-m", str(model_dir), "-d", str(qa_file), "--samples", "8"]
    cmd += ["--dtype", "float64", "-q", "-o", str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_torchrun_two_processes_equal_one(tiny_model_dir, qa_file, tmp_path):
    """docs/design.md §5: data-parallel estimate all-reduces G; gloo on CPU, 2 processes."""
    single = tmp_path / "single.safetensors"
    _run(tiny_model_dir, qa_file, single)
    two = tmp_path / "two.safetensors"
    _torchrun_estimate(tiny_model_dir, qa_file, two, 29517)
    a, b = artifacts.Artifact(single), artifacts.Artifact(two)
    assert b.fields["samples"] == 8
    for name in a.names:
        assert torch.equal(a.get(name), b.get(name)), name


def test_torchrun_report_ranks_takes_the_jobs_halves(tiny_model_dir, qa_file, tmp_path):
    """--report-ranks on 2 gloo processes: the same halves, update and stability report as one process."""
    single = _run(tiny_model_dir, qa_file, tmp_path / "single.safetensors", report_ranks="2,4")
    done = _torchrun_estimate(tiny_model_dir, qa_file, tmp_path / "two.safetensors", 29519, "--report-ranks", "2,4")
    assert done.stdout == f"{tmp_path / 'two.safetensors'}\n"  # one line for the job
    a, b = artifacts.Artifact(tmp_path / "single.safetensors"), artifacts.Artifact(tmp_path / "two.safetensors")
    for name in a.names:
        assert torch.equal(a.get(name), b.get(name)), name
    two = b.fields["stability"]
    assert two["samples"] == single.stability["samples"] == [4, 4]
    for module, entry in single.stability["modules"].items():
        for side in ("B", "A"):
            assert two["modules"][module][side] == pytest.approx(entry[side], abs=1e-4), (module, side)


def test_targets_presets_and_suffixes():
    model, _ = make_llama()
    assert len(models.resolve_targets(model, "all-linear")) == 14
    attention = models.resolve_targets(model, "attention")
    assert len(attention) == 8 and all(".self_attn." in n for n in attention)
    assert models.resolve_targets(model, "q_proj,v_proj") == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert "lm_head" not in models.resolve_targets(model, "all-linear")
    from lorasb_cli.errors import BadInputError

    with pytest.raises(BadInputError, match="'nope' matches no linear module"):
        models.resolve_targets(model, "q_proj,nope")


def test_fingerprint_depends_on_names_and_shapes():
    a, _ = make_llama(hidden=64)
    b, _ = make_llama(hidden=64, seed=1)
    c, _ = make_llama(hidden=32)
    fp = {
        k: models.fingerprint(models.target_shapes(m, models.resolve_targets(m, "all-linear")))
        for k, m in {"a": a, "b": b, "c": c}.items()
    }
    assert fp["a"] == fp["b"] != fp["c"]


# --- issue 13: the chunked per-sample loss, bfloat16 accumulators ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_per_sample_loss_equals_autograd_cross_entropy(dtype, monkeypatch):
    """Value and logits gradient of per_sample_loss_sum against F.cross_entropy per sample, over several chunks."""
    from lorasb_cli import loss

    monkeypatch.setattr(loss, "LOSS_CHUNK_BYTES", 4 * 7 * 3)  # 3 rows of the 7-token vocabulary per chunk
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 7)).to(dtype).requires_grad_(True)
    labels = torch.tensor([[9, 1, 2, 3, 4], [9, data.IGNORE, 5, data.IGNORE, 6], [9] + [data.IGNORE] * 4])
    loss, tokens = per_sample_loss_sum(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)

    reference = logits.detach().float().requires_grad_(True)
    expected = sum(
        torch.nn.functional.cross_entropy(reference[i, :-1], labels[i, 1:], ignore_index=data.IGNORE)
        for i in range(2)  # sample 2 has no supervised token: it adds 0
    )
    (expected_grad,) = torch.autograd.grad(expected, reference)
    assert tokens == 6 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    assert grad.dtype == dtype
    assert not grad[2].any() and not grad[:, -1].any()  # no supervised token, no target: no gradient
    tolerance = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}  # bf16 logits' gradient rounds
    torch.testing.assert_close(grad.float(), expected_grad, **tolerance)


def test_bfloat16_accumulators_keep_the_sign_wherever_g_is_clear_of_rounding():
    """Summing in bf16 rounds each batch's float32 gradient into the running sum: |G_bf16 − G| ≤ Σ_b u·|S_b| with
    S_b the partial sums and u = 2⁻⁸ (bf16's 8 significant bits). Where |G| exceeds that bound, the sign — all
    the update keeps — is G's; the rest are entries near 0 whose sign float32 noise could flip too."""
    model, tokenizer = make_llama()
    modules = models.resolve_targets(model, "all-linear")
    examples = _examples(tokenizer)
    per_batch = [estimate.sum_gradients(model, modules, [b]).sums for b in data.make_batches(examples, 1, 0)]
    assert len(per_batch) == 12  # twelve roundings into the running sum
    g32 = estimate.sum_gradients(model, modules, data.make_batches(examples, 1, 0)).sums
    g16 = estimate.sum_gradients(
        model, modules, data.make_batches(examples, 1, 0), accumulate_dtype=torch.bfloat16
    ).sums
    clear = total = 0
    for name in modules:
        assert g16[name].dtype == torch.bfloat16 and g32[name].dtype == torch.float32
        partial = torch.cumsum(torch.stack([g[name] for g in per_batch]), dim=0)
        bound = 2.0**-8 * partial.abs().sum(dim=0)
        error = (g16[name].float() - g32[name]).abs()
        assert (error <= bound + 1e-12).all(), name
        is_clear = g32[name].abs() > bound
        assert torch.equal(torch.sign(g16[name].float())[is_clear], torch.sign(g32[name])[is_clear]), name
        clear += int(is_clear.sum())
        total += is_clear.numel()
    assert clear > 0.9 * total  # the bound excludes only entries near 0
    assert any(not torch.equal(g16[n].float(), g32[n]) for n in modules)  # bf16 really rounded


def test_accumulators_on_the_model_device_and_dtype_reach_the_artifact(tiny_model_dir, qa_file, tmp_path):
    base = _run(tiny_model_dir, qa_file, tmp_path / "f32.safetensors", raw=True)
    half = _run(
        tiny_model_dir,
        qa_file,
        tmp_path / "bf16.safetensors",
        raw=True,
        accumulate_dtype="bfloat16",
        accumulate_on="cpu",
    )
    assert (base.accumulate_dtype, half.accumulate_dtype) == ("float32", "bfloat16")
    a, b = (artifacts.Artifact(tmp_path / f, kinds=("update-raw",)) for f in ("f32.safetensors", "bf16.safetensors"))
    for name in a.names:
        g, h = a.get(name), b.get(name)
        assert h.dtype == torch.float32  # raw shards store float32 sums whatever the accumulators were
        assert torch.equal(h, h.to(torch.bfloat16).float())  # ...of values that are bf16
        torch.testing.assert_close(h, g, atol=1e-3 * float(g.abs().max()), rtol=2**-7)


def test_chunked_loss_gradient_of_a_scaled_or_negated_loss(monkeypatch):
    """The backward folds w into the exponent for w ≥ 0 and multiplies otherwise: both give autograd's gradient."""
    from lorasb_cli import loss

    monkeypatch.setattr(loss, "LOSS_CHUNK_BYTES", 4 * 11 * 4)  # 4 rows of the 11-token vocabulary per chunk
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 11, dtype=torch.float64).float().requires_grad_(True)
    labels = torch.tensor([[3, 1, 2, data.IGNORE, 4, 5], [7, 8, 9, 10, 0, data.IGNORE]])
    reference = logits.detach().clone().requires_grad_(True)
    expected = sum(
        torch.nn.functional.cross_entropy(reference[i, :-1], labels[i, 1:], ignore_index=data.IGNORE) for i in range(2)
    )
    for factor in (2.5, -0.5):
        loss, _ = per_sample_loss_sum(logits, labels)
        (grad,) = torch.autograd.grad(factor * loss, logits)
        (expected_grad,) = torch.autograd.grad(factor * expected, reference, retain_graph=True)
        torch.testing.assert_close(grad, expected_grad)
