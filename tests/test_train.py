"""train: only R moves, loss falls, resume is exact, divergence keeps the last good checkpoint, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import QA_ROWS, make_llama, save_model, train_config, write_jsonl

from lorasb_cli import adapter, artifacts, train
from lorasb_cli.errors import BadInputError, IncompatibleArtifactError, RunFailure
from lorasb_cli.methods import lorasb as lorasb_method


def _config(tiny_model_dir, qa_file, factors_file, out, **overrides):
    return train_config(tiny_model_dir, qa_file, out, factors=factors_file, **overrides)


def _adapter_r(run_dir) -> dict[str, torch.Tensor]:
    saved = adapter.load_adapter(run_dir)
    return {m: r for m, (_, r, _) in saved.factors.items()}


def test_only_r_changes_b_a_identical_and_loss_falls(tiny_model_dir, qa_file, factors_file, tmp_path):
    summary = train.train(_config(tiny_model_dir, qa_file, factors_file, tmp_path / "run"))
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"adapter.safetensors", "adapter_config.json", "metrics.json", "loss.png"}
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    trained = adapter.load_adapter(run)
    original = artifacts.Artifact(factors_file)
    assert trained.fields["kind"] == "adapter" and trained.fields["rank"] == 4 and trained.fields["method"] == "lorasb"
    for module, (lora_B, lora_R, lora_A) in trained.factors.items():
        assert torch.equal(lora_B, original.get(f"{module}.lora_B"))
        assert torch.equal(lora_A, original.get(f"{module}.lora_A"))
        assert not torch.equal(lora_R, original.get(f"{module}.lora_R"))
        # R is a full matrix after training: the off-diagonal moved too.
        assert torch.count_nonzero(lora_R - torch.diag(torch.diagonal(lora_R))) > 0
    metrics = json.loads((run / "metrics.json").read_text())
    losses = [s["loss"] for s in metrics["loss"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert summary.trainable_params == 14 * 16 and summary.lora_params_same_rank > 20 * summary.trainable_params
    assert summary.step0_base_loss is not None and summary.tokens_per_second > 0 and metrics["peak_memory_bytes"] > 0
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_adapter_forward_matches_merged_weight_with_non_symmetric_r():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=True)
    lora_B = torch.linalg.qr(torch.randn(10, 3))[0]
    lora_A = torch.linalg.qr(torch.randn(12, 3))[0].T
    lora_R = torch.randn(3, 3)  # non-symmetric: a transposed R would show
    layer = adapter.LoraSBLinear(base, lora_B, lora_R, lora_A, scale=0.5)
    x = torch.randn(5, 12)
    expected = x @ (base.weight + 0.5 * lora_B @ lora_R @ lora_A).T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 0.5 * lora_B @ lora_R @ lora_A)


def test_bf16_base_keeps_r_in_float32():
    base = torch.nn.Linear(8, 8).to(torch.bfloat16)
    layer = adapter.LoraSBLinear(base, torch.eye(8)[:, :2], torch.eye(2), torch.eye(8)[:2], 1.0)
    assert layer.lora_R.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    out = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_R.grad.dtype == torch.float32 and base.weight.grad is None


def test_inject_and_remove_restore_the_model():
    model, _ = make_llama()
    ids = torch.tensor([[1, 7, 9, 11]])
    before = model(input_ids=ids).logits
    path = "model.layers.0.self_attn.q_proj"
    layers = adapter.inject(model, {path: (torch.zeros(64, 2), torch.eye(2), torch.zeros(2, 64))})
    assert isinstance(model.get_submodule(path), adapter.LoraSBLinear) and list(layers) == [path]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{path}.lora_R"]
    adapter.remove(model)
    assert isinstance(model.get_submodule(path), torch.nn.Linear)
    torch.testing.assert_close(model(input_ids=ids).logits, before)


class _Crash(Exception):
    pass


def test_resume_after_a_crash_reaches_the_same_r(tiny_model_dir, qa_file, factors_file, tmp_path):
    from transformers import TrainerCallback

    train.train(_config(tiny_model_dir, qa_file, factors_file, tmp_path / "full"))

    class CrashAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise _Crash

    interrupted = tmp_path / "interrupted"
    with pytest.raises(_Crash):
        train.train(_config(tiny_model_dir, qa_file, factors_file, interrupted), callbacks=[CrashAtStep5()])
    assert not (interrupted / "adapter.safetensors").exists()
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    summary = train.train(_config(tiny_model_dir, qa_file, factors_file, interrupted, resume=True))
    assert summary.steps == 8
    full, resumed = _adapter_r(tmp_path / "full"), _adapter_r(interrupted)
    for module in full:
        assert torch.equal(full[module], resumed[module]), module


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, qa_file, factors_file, tmp_path):
    from transformers import TrainerCallback

    class PoisonAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                layer = next(m for m in model.modules() if isinstance(m, adapter.LoraSBLinear))
                with torch.no_grad():
                    layer.lora_R[0, 0] = float("inf")

    out = tmp_path / "run"
    with pytest.raises(RunFailure) as excinfo:
        train.train(_config(tiny_model_dir, qa_file, factors_file, out), callbacks=[PoisonAtStep3()])
    assert "at step 3" in str(excinfo.value) and "checkpoint-2" in str(excinfo.value)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    good = _adapter_r(out / "checkpoint-2")
    assert all(torch.isfinite(r).all() for r in good.values())


def test_factors_of_another_model_are_refused_before_loading(qa_file, factors_file, tmp_path):
    other, tokenizer = make_llama(hidden=32)
    other_dir = save_model(other, tokenizer, tmp_path / "other")
    with pytest.raises(IncompatibleArtifactError, match=r"factors of 'model\.layers\.0\..*' are for a"):
        train.train(_config(other_dir, qa_file, factors_file, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_existing_output_needs_resume_or_overwrite(tiny_model_dir, qa_file, factors_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(BadInputError, match="not empty"):
        train.train(_config(tiny_model_dir, qa_file, factors_file, out))
    with pytest.raises(BadInputError, match="no checkpoint"):
        train.train(_config(tiny_model_dir, qa_file, factors_file, tmp_path / "fresh", resume=True))


def test_eval_data_gives_eval_loss(tiny_model_dir, qa_file, factors_file, tmp_path):
    eval_file = write_jsonl(tmp_path / "eval.jsonl", QA_ROWS[:4])
    summary = train.train(
        _config(tiny_model_dir, qa_file, factors_file, tmp_path / "run", eval_data=str(eval_file), eval_steps=4)
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["step"] for e in metrics["eval"]][:2] == [4, 8] and summary.final_eval_loss is not None


def test_step0_and_final_losses_are_one_definition_on_the_eval_rows(tiny_model_dir, qa_file, factors_file, tmp_path):
    """With --eval-data every loss of the summary is the per-sample mean on the eval rows, even under `auto`, whose
    own choice is made (and recorded) on its held-out training slice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasb_cli import data, loss

    eval_file = write_jsonl(tmp_path / "eval.jsonl", QA_ROWS[:5])
    summary = train.train(
        _config(
            tiny_model_dir,
            qa_file,
            factors_file,
            tmp_path / "run",
            eval_data=str(eval_file),
            max_steps=2,
            init_scale="auto",
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = data.encode(QA_ROWS[:5], "prompt-response", tokenizer, 512, None, "alpaca")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert summary.step0_base_loss == pytest.approx(loss.mean_loss(model, examples, 4, tokenizer.pad_token_id))
        saved = adapter.load_adapter(tmp_path / "run")
        adapter.inject(model, saved.factors, scale=saved.scale)
        assert summary.final_eval_loss == pytest.approx(loss.mean_loss(model, examples, 4, tokenizer.pad_token_id))
    curve = json.loads((tmp_path / "run" / "adapter_config.json").read_text())["init_scale_curve"]
    assert summary.step0_init_loss not in [value for _, value in curve]  # the choice's probe is another slice


def test_init_scale_auto_picks_the_lowest_probe_loss_and_records_it(tiny_model_dir, qa_file, factors_file, tmp_path):
    summary = train.train(
        _config(tiny_model_dir, qa_file, factors_file, tmp_path / "run", init_scale="auto", max_steps=2)
    )
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    curve = config["init_scale_curve"]
    assert [round(k, 6) for k, _ in curve] == [round(k, 6) for k in lorasb_method.INIT_SCALE_GRID]
    best = min(curve, key=lambda point: point[1])
    assert config["init_scale"] == best[0]
    assert summary.step0_init_loss == pytest.approx(best[1], rel=1e-6)  # the step-0 loss is that of the pick


def test_choose_init_scale_restores_r():
    layer = adapter.LoraSBLinear(torch.nn.Linear(4, 4), torch.eye(4)[:, :2], torch.eye(2), torch.eye(4)[:2], 1.0)
    before = layer.lora_R.detach().clone()
    best, curve = lorasb_method.choose_init_scale({"m": layer}, lambda: float((layer.lora_R.sum() - 6.0) ** 2))
    assert best == pytest.approx(3.1623, rel=1e-3) and len(curve) == len(lorasb_method.INIT_SCALE_GRID)
    assert torch.equal(layer.lora_R, before)


def test_eval_task_scores_at_eval_steps_and_at_the_end(tiny_model_dir, qa_file, factors_file, tmp_path):
    eval_file = write_jsonl(tmp_path / "eval.jsonl", QA_ROWS[:3])
    config = _config(
        tiny_model_dir,
        qa_file,
        factors_file,
        tmp_path / "run",
        eval_data=str(eval_file),
        eval_steps=3,
        eval_task="perplexity",
        max_steps=6,
    )
    train.train(config)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["step"] for r in metrics["task"]] == [3, 6]
    assert all(r["task"] == "perplexity" and r["count"] == 3 for r in metrics["task"])
    with pytest.raises(BadInputError, match="--eval-task needs --eval-data"):
        train.train(_config(tiny_model_dir, qa_file, factors_file, tmp_path / "x", eval_task="gsm8k"))
