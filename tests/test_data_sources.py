"""Data the way users name it: hub-style data set folders with configurations, renamed fields, lazy Arrow rows,
and STS-B-shaped regression through estimate, train, merge and evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CLASS_ROWS, QA_ROWS, make_bert_dir, write_jsonl

from lorasb_cli import adapter, cli, data, estimate, evaluate, models, train
from lorasb_cli.decompose import DecomposeConfig, decompose
from lorasb_cli.errors import BadInputError
from lorasb_cli.merge import MergeConfig, merge

RENAMED = [{"problem_text": row["question"], "solution": row["answer"], "id": i} for i, row in enumerate(QA_ROWS)]


def hub_style_folder(root, rows_by_config: dict[str, dict[str, list[dict]]]):
    """A data set repo as the hub lays it out: parquet files per config and split, configs declared in README."""
    import datasets

    lines = ["---", "configs:"]
    for config, splits in rows_by_config.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            path = root / config / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(str(path))
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*.parquet"]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))
    return root


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    other = [{"problem_text": "unused", "solution": "#### 0"}]
    return hub_style_folder(
        tmp_path_factory.mktemp("hub") / "someone--gsm",
        {"main": {"train": RENAMED, "test": RENAMED[:4]}, "other": {"train": other}},
    )


def run(args, capsys) -> str:
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert excinfo.value.code == 0, err
    return out.strip()


def test_config_split_and_fields_pick_the_rows(hub_folder):
    main = data.load_dataset_rows(str(hub_folder), "train", "main", fields="prompt=problem_text,response=solution")
    assert len(main.rows) == len(QA_ROWS) and set(main.columns) == {"prompt", "response", "id"}
    assert main.rows[3] == {"prompt": QA_ROWS[3]["question"], "response": QA_ROWS[3]["answer"], "id": 3}
    assert main.provenance()["config"] == "main"
    assert len(data.load_dataset_rows(str(hub_folder), "test", "main").rows) == 4
    assert len(data.load_dataset_rows(str(hub_folder), "train", "other").rows) == 1
    with pytest.raises(BadInputError, match="config other, split 'test'"):
        data.load_dataset_rows(str(hub_folder), "test", "other")
    with pytest.raises(BadInputError, match="--fields names columns question the data lacks"):
        data.load_dataset_rows(str(hub_folder), "train", "main", fields="prompt=question")
    with pytest.raises(BadInputError, match="is not ROLE=COLUMN"):
        data.parse_fields("query=problem_text")


def test_save_to_disk_folders_load_by_split(tmp_path):
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(QA_ROWS), "test": datasets.Dataset.from_list(QA_ROWS[:2])}
    ).save_to_disk(str(tmp_path / "saved"))
    assert len(data.load_dataset_rows(str(tmp_path / "saved"), "test").rows) == 2
    with pytest.raises(BadInputError, match="no split 'validation'"):
        data.load_dataset_rows(str(tmp_path / "saved"), "validation")


def test_estimate_train_evaluate_on_a_hub_style_data_set_with_config_and_renamed_fields(
    tiny_model_dir, hub_folder, tmp_path, capsys
):
    common = ["--data", hub_folder, "--data-config", "main", "--fields", "prompt=problem_text,response=solution"]
    update = run(
        ["estimate", "-m", tiny_model_dir, *common, "--samples", "8", "-o", tmp_path / "u.safetensors"], capsys
    )
    factors = run(["decompose", update, "--rank", "4", "-o", tmp_path / "f.safetensors"], capsys)
    run_dir = run(
        ["train", "-m", tiny_model_dir, "--factors", factors, *common, "--max-steps", "2", "-o", tmp_path / "run"],
        capsys,
    )
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (
        config["data"]["config"] == "main" and config["data"]["template"] == "plain"
    )  # named prompt/response pairs: plain
    results = run(
        [
            "evaluate",
            "-m",
            tiny_model_dir,
            "--adapter",
            run_dir,
            "--task",
            "gsm8k",
            "--data",
            hub_folder,
            "--data-config",
            "main",
            "--split",
            "test",
            "--fields",
            "question=problem_text,answer=solution",
            "--max-new-tokens",
            "4",
            "-o",
            tmp_path / "r.json",
        ],
        capsys,
    )
    scored = json.loads(Path(results).read_text())
    assert scored["count"] == 4 and scored["template"] == "plain"
    assert {"strict_accuracy", "flexible_accuracy"} <= set(scored["metrics"])


def test_estimate_reads_only_the_rows_it_draws(tiny_model_dir, tmp_path, monkeypatch):
    rows = [{"question": f"What is {i} plus 1?", "answer": f"#### {i + 1}"} for i in range(3000)]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    assert isinstance(data.load_dataset_rows(str(path)).rows, data.JsonLines)
    read: list[int] = []
    get = data.JsonLines.__getitem__
    monkeypatch.setattr(data.JsonLines, "__getitem__", lambda self, i: read.append(i) or get(self, i))
    estimate.estimate(
        estimate.EstimateConfig(model=str(tiny_model_dir), data=str(path), out=str(tmp_path / "u"), frac=0.001)
    )
    drawn = set(data.sample_indices(3000, frac=0.001, samples=None, seed=0, min_samples=32))
    assert len(drawn) == 32 and drawn <= set(read) <= drawn | {0}  # row 0 tells the fields
    assert sorted(i for i in read if i) == sorted(drawn - {0})  # each drawn row is read (and checked) once


def test_train_tokenizes_rows_as_the_loader_reads_them(tiny_model_dir, factors_file, tmp_path, monkeypatch):
    rows = write_jsonl(tmp_path / "rows.jsonl", QA_ROWS * 20)
    encoded: list[str] = []
    call = data.Encoder.__call__
    monkeypatch.setattr(data.Encoder, "__call__", lambda self, row: encoded.append(row["question"]) or call(self, row))
    train.train(
        train.TrainConfig.from_options(
            model=str(tiny_model_dir),
            factors=str(factors_file),
            data=str(rows),
            out=str(tmp_path / "run"),
            max_steps=1,
            batch_size=2,
        )
    )
    # the step-0 probe (the first 64 rows) and the batch of two (accelerate's loader reads one batch ahead), not
    # all 240 rows up front
    assert 64 + 2 <= len(encoded) <= 64 + 4


STS_ROWS = [
    {"sentence1": f"{a} the {v} said", "sentence2": f"{b} the {v} said", "label": 5.0 if a == b else 0.4 * i}
    for i, (a, b) in enumerate(
        [
            ("oil", "oil"),
            ("oil", "barrel"),
            ("profit", "dividend"),
            ("tariff", "tariff"),
            ("export", "oil"),
            ("bank", "bank"),
            ("dividend", "export"),
            ("barrel", "barrel"),
        ]
    )
    for v in ("company", "market")
]


def test_float_labels_are_regression(tmp_path):
    assert data.float_labels(STS_ROWS) and not data.float_labels(CLASS_ROWS)
    assert data.detect_format(list(STS_ROWS[0]), "auto", floats=True) == "regression"
    assert data.head_labels("regression", STS_ROWS) == data.REGRESSION_LABELS
    with pytest.raises(BadInputError, match="numeric labels"):
        data.encode([{"text": "oil", "label": "high"}], "regression", None, 16, data.REGRESSION_LABELS)


def test_regression_gradient_is_the_sum_of_per_sample_mse_gradients(tmp_path):
    """G through the MSE of a one-output head equals autograd of HF's own regression loss, sample by sample."""
    ref = models.resolve_model(str(make_bert_dir(tmp_path / "bert")))
    model, tokenizer = models.load_model(
        ref, dtype=torch.float32, device=torch.device("cpu"), labels=data.REGRESSION_LABELS, seed=0
    )
    examples = data.encode(STS_ROWS, "regression", tokenizer, 32, data.REGRESSION_LABELS)
    modules = models.resolve_targets(model, "all-linear")
    named = dict(model.named_modules())
    for name in modules:
        named[name].weight.requires_grad_(True)
    for batch in data.make_batches(examples, 1, tokenizer.pad_token_id):
        model(**batch).loss.backward()  # HF: MSELoss, problem_type regression
    reference = {name: named[name].weight.grad.clone() for name in modules}
    model.zero_grad(set_to_none=True)
    result = estimate.sum_gradients(model, modules, data.make_batches(examples, 5, tokenizer.pad_token_id))
    for name in modules:
        torch.testing.assert_close(result.sums[name], reference[name], rtol=1e-4, atol=1e-6)
    assert any(g.abs().max() > 0 for g in result.sums.values())


def test_regression_trains_merges_and_scores_end_to_end(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model_dir = make_bert_dir(tmp_path / "bert")
    rows = write_jsonl(tmp_path / "sts.jsonl", STS_ROWS)
    estimate.estimate(estimate.EstimateConfig(model=str(model_dir), data=str(rows), out=str(tmp_path / "u"), samples=8))
    decompose(DecomposeConfig.from_options(update=str(tmp_path / "u"), rank=4, out=str(tmp_path / "f")))
    summary = train.train(
        train.TrainConfig.from_options(
            model=str(model_dir),
            factors=str(tmp_path / "f"),
            data=str(rows),
            out=str(tmp_path / "run"),
            max_steps=30,
            batch_size=8,
            lr=2e-2,
        )
    )
    assert summary.final_train_loss < summary.step0_init_loss  # MSE goes down
    trained = adapter.load_adapter(tmp_path / "run")
    assert trained.fields["labels"] == ["score"] and trained.extra["classifier.weight"].shape == (1, 32)
    merged = merge(MergeConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "merged")))
    loaded = AutoModelForSequenceClassification.from_pretrained(merged)
    assert loaded.config.num_labels == 1 and loaded.config.problem_type == "regression"
    for model in (str(merged), str(model_dir)):
        scored = evaluate.evaluate(
            evaluate.EvaluateConfig(
                model=model,
                adapter=None if model == str(merged) else str(tmp_path / "run"),
                task="glue-stsb",
                data=str(rows),
                out=str(tmp_path / "r.json"),
            )
        )
        assert scored.count == len(STS_ROWS) and -1 <= scored.metrics["pearson"] <= 1
        assert isinstance(scored.metrics["spearman"], float)
