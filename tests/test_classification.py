"""Classification end to end on a tiny encoder: head estimated with, trained with R, merged, evaluated."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CLASS_ROWS, classifier_factors, make_bert_dir, write_jsonl

from lorasb_cli import adapter, artifacts, estimate, evaluate, train
from lorasb_cli.errors import BadInputError
from lorasb_cli.merge import MergeConfig, merge


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cls")
    model_dir = make_bert_dir(folder / "bert")
    data = write_jsonl(folder / "train.jsonl", CLASS_ROWS)
    classifier_factors(folder, model_dir, data)
    train.train(
        train.TrainConfig.from_options(
            model=str(model_dir),
            factors=str(folder / "f.safetensors"),
            data=str(data),
            out=str(folder / "run"),
            max_steps=12,
            batch_size=6,
            lr=2e-2,
            save_steps=100,
        )
    )
    return folder, model_dir, data


def test_update_and_factors_carry_the_head_g_was_computed_with(chain):
    folder, _, _ = chain
    update = artifacts.Artifact(folder / "u.safetensors")
    assert update.fields["labels"] == ["crude", "earn", "trade"]
    assert update.fields["architecture"] == "BertForSequenceClassification"
    assert update.fields["head"] == ["classifier.bias", "classifier.weight"]
    assert update.get("classifier.weight").shape == (3, 32)
    assert "classifier" not in {n.rsplit(".", 1)[0] for n in update.names if n not in update.fields["head"]}
    factors = artifacts.Artifact(folder / "f.safetensors")
    assert torch.equal(factors.get("classifier.weight"), update.get("classifier.weight"))
    # The same seed draws the same head; another seed another one.
    again = folder / "again.safetensors"
    estimate.estimate(
        estimate.EstimateConfig(
            model=str(chain[1]), data=str(chain[2]), out=str(again), samples=12, format="classification", seed=3
        )
    )
    assert torch.equal(artifacts.Artifact(again).get("classifier.weight"), update.get("classifier.weight"))


def test_training_moves_r_and_the_head(chain):
    folder, _, _ = chain
    trained = adapter.load_adapter(folder / "run")
    factors = artifacts.Artifact(folder / "f.safetensors")
    assert set(trained.extra) == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(trained.extra["classifier.weight"], factors.get("classifier.weight"))
    module, (lora_B, lora_R, _) = next(iter(trained.factors.items()))
    assert module.startswith("bert.encoder.")
    assert torch.equal(lora_B, factors.get(f"{module}.lora_B"))
    assert not torch.equal(lora_R, factors.get(f"{module}.lora_R"))


def test_merged_classifier_reproduces_the_adapter_logits(chain, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, model_dir, _ = chain
    merged = merge(MergeConfig(adapter=str(folder / "run"), out=str(tmp_path / "merged")))
    loaded = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert loaded.config.id2label == {0: "crude", 1: "earn", 2: "trade"}

    cfg = evaluate.EvaluateConfig(model=str(model_dir), adapter=str(folder / "run"), task="classification", out="x")
    adapted, _tokenizer = evaluate.load_for_task(
        cfg, evaluate.get_task("classification"), "classify", adapter.load_adapter(cfg.adapter)
    )
    batch = AutoTokenizer.from_pretrained(merged)(
        ["oil oil the bank said", "profit the market"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=0)

    data = write_jsonl(tmp_path / "test.jsonl", CLASS_ROWS)
    result = evaluate.evaluate(
        evaluate.EvaluateConfig(model=str(merged), task="classification", data=str(data), out=str(tmp_path / "r.json"))
    )
    assert result.metrics["labels"] == ["crude", "earn", "trade"] and len(result.metrics["confusion_matrix"]) == 3


def test_classification_with_a_causal_lm_names_the_auto_class(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "c.jsonl", CLASS_ROWS)
    config = estimate.EstimateConfig(
        model=str(tiny_model_dir),
        data=str(data),
        out=str(tmp_path / "u.safetensors"),
        samples=4,
        format="classification",
    )
    with pytest.raises(BadInputError, match="AutoModelForSequenceClassification"):
        estimate.estimate(config)


def test_eval_labels_outside_the_trained_classes_are_refused(chain, tmp_path):
    folder, model_dir, data = chain
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"text": "oil said", "label": "sports"}])
    config = train.TrainConfig.from_options(
        model=str(model_dir),
        factors=str(folder / "f.safetensors"),
        data=str(data),
        eval_data=str(odd),
        out=str(tmp_path / "run"),
        max_steps=1,
    )
    with pytest.raises(BadInputError, match="labels sports are not among the model's classes"):
        train.train(config)


def test_the_head_spec_is_what_each_artifact_of_the_chain_records(chain):
    """One HeadSpec from the model, the same from the update's, the factors' and the adapter's metadata."""
    from lorasb_cli import metadata, models

    folder = chain[0]
    paths = [folder / "u.safetensors", folder / "f.safetensors", folder / "run" / "adapter.safetensors"]
    specs = {models.HeadSpec.from_meta(artifacts.Artifact(path).meta) for path in paths}
    assert len(specs) == 1
    spec = specs.pop()
    assert spec.architecture == "BertForSequenceClassification" and spec.tensors and len(spec.labels) == 3
    base = metadata.BaseIdentity(id="toy", fingerprint="0" * 16)
    recorded = metadata.UpdateMeta(base_model=base, targets="all-linear", eta=1e-5, **models.head_meta(spec))
    assert models.HeadSpec.from_meta(recorded) == spec
    assert models.head_meta(None) == {} and models.auto_head(None) == "causal-lm"


def test_adapter_logits_are_the_hand_merged_classifiers_and_differ_from_its_head_alone(chain):
    """The reference is built without lorasb: transformers' classifier with W0 + s·B·R·A written into its state dict
    from the adapter file's tensors and the trained head copied in. The adapted model evaluate loads gives its
    logits; the same head on the unchanged encoder does not, so the trained R changes what the model says."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, model_dir, _ = chain
    tensors = load_file(folder / "run" / "adapter.safetensors")
    scale = json.loads((folder / "run" / "adapter_config.json").read_text())["scale"]
    head_only = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3).eval()
    state = head_only.state_dict()
    head = {name: tensors[name] for name in ("classifier.weight", "classifier.bias")}
    head_only.load_state_dict(state | head)
    merged = {
        f"{module}.weight": state[f"{module}.weight"]
        + scale * tensors[f"{module}.lora_B"] @ tensors[f"{module}.lora_R"] @ tensors[f"{module}.lora_A"]
        for module in (name.removesuffix(".lora_R") for name in tensors if name.endswith(".lora_R"))
    }
    assert len(merged) == 13  # 6 linear layers in each of 2 blocks, and the pooler
    reference = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3).eval()
    reference.load_state_dict(state | head | merged)

    cfg = evaluate.EvaluateConfig(model=str(model_dir), adapter=str(folder / "run"), task="classification", out="x")
    adapted, _tokenizer = evaluate.load_for_task(
        cfg, evaluate.get_task("classification"), "classify", adapter.load_adapter(cfg.adapter)
    )
    batch = AutoTokenizer.from_pretrained(model_dir)(
        ["oil oil the bank said", "profit the market", "tariff"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        got = adapted(**batch).logits
        torch.testing.assert_close(got, reference(**batch).logits, atol=1e-5, rtol=0)
        assert (got - head_only(**batch).logits).abs().max() > 1e-2
