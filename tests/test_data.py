"""Data: loading local files, format detection, prompt masking, sampling, sharding and batching."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import QA_ROWS, make_tokenizer, write_jsonl

from lorasb_cli import data, templates
from lorasb_cli.errors import BadInputError


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_file_types_load_the_same_rows(tmp_path, suffix):
    rows = QA_ROWS[:3]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["question", "answer"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    loaded = data.load_dataset_rows(str(path))
    assert loaded.rows == rows and len(loaded.digest) == 16 and loaded.source == str(path.resolve())


def test_missing_empty_and_unsupported_files(tmp_path):
    with pytest.raises(BadInputError, match="data file not found"):
        data.load_dataset_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(BadInputError, match="data file is empty"):
        data.load_dataset_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(BadInputError, match="unsupported data file type"):
        data.load_dataset_rows(str(tmp_path / "d.txt"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(BadInputError, match="cannot read data file"):
        data.load_dataset_rows(str(tmp_path / "bad.jsonl"))


def test_unreachable_hub_dataset_is_bad_input():
    with pytest.raises(BadInputError, match="cannot load data set 'someone/absent'"):
        data.load_dataset_rows("someone/absent")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (["query", "response", "type"], "prompt-response"),
        (["question", "answer"], "prompt-response"),
        (["instruction", "input", "output"], "prompt-response"),
        (["prompt", "completion"], "prompt-response"),
        (["text"], "text"),
        (["text", "label"], "classification"),
        (["sentence1", "sentence2", "label"], "classification"),
    ],
)
def test_auto_format(fields, expected):
    assert data.detect_format(fields, "auto") == expected


def test_format_lacking_fields_names_them():
    with pytest.raises(BadInputError, match="needs the fields text; the data has answer, question"):
        data.detect_format(["question", "answer"], "text")
    with pytest.raises(BadInputError, match="cannot tell the data format"):
        data.detect_format(["foo"], "auto")
    with pytest.raises(BadInputError, match="did you mean 'text'"):
        data.detect_format(["text"], "txt")


def test_prompt_response_masks_the_prompt_and_appends_eos():
    tokenizer = make_tokenizer()
    (example,) = data.encode([{"question": "What is 1 plus 2?", "answer": "3"}], "prompt-response", tokenizer, 256)
    prompt, response = templates.Template("alpaca", tokenizer).split({"question": "What is 1 plus 2?", "answer": "3"})
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n") and response == "3"
    prompt_ids = tokenizer(prompt)["input_ids"]
    joint = tokenizer(prompt + response)["input_ids"]
    assert joint[: len(prompt_ids)] == prompt_ids  # this tokenizer splits at the newline
    assert example.input_ids == joint + [tokenizer.eos_token_id]
    assert example.labels == [data.IGNORE] * len(prompt_ids) + joint[len(prompt_ids) :] + [tokenizer.eos_token_id]
    assert data.supervised_tokens(example) == len(joint) - len(prompt_ids) + 1


def test_alpaca_input_field_uses_the_input_template():
    alpaca = templates.Template("alpaca", None)
    prompt, _ = alpaca.split({"instruction": "Add.", "input": "1 and 2", "output": "3"})
    assert "### Input:\n1 and 2" in prompt
    prompt, _ = alpaca.split({"instruction": "Add.", "input": "", "output": "3"})
    assert "### Input" not in prompt


def test_text_format_supervises_every_token_and_truncates():
    tokenizer = make_tokenizer()
    (example,) = data.encode([{"text": "the cat sat on the mat " * 20}], "text", tokenizer, 16)
    assert len(example.input_ids) == 16 and example.labels == example.input_ids
    assert example.input_ids == tokenizer("the cat sat on the mat " * 20, truncation=True, max_length=16)["input_ids"]


def test_sampling_by_fraction_and_count():
    assert len(data.sample_indices(5000, frac=0.001, samples=None, seed=0)) == 5
    assert len(data.sample_indices(10, frac=0.001, samples=None, seed=0)) == 1  # rounded up, at least 1
    assert len(data.sample_indices(1001, frac=0.001, samples=None, seed=0)) == 2
    a = data.sample_indices(100, frac=None, samples=10, seed=1)
    assert (
        a
        == data.sample_indices(100, frac=None, samples=10, seed=1)
        != data.sample_indices(100, frac=None, samples=10, seed=2)
    )
    assert len(set(a)) == 10 and all(0 <= i < 100 for i in a)


@pytest.mark.parametrize("frac", [0.0, -0.1, 1.5])
def test_frac_outside_unit_interval(frac):
    with pytest.raises(BadInputError, match=r"outside \(0, 1\]"):
        data.sample_indices(100, frac=frac, samples=None, seed=0)


def test_samples_larger_than_split():
    with pytest.raises(BadInputError, match="larger than the split"):
        data.sample_indices(12, frac=None, samples=13, seed=0)


def test_shards_are_disjoint_and_cover_the_sample():
    drawn = data.sample_indices(50, frac=None, samples=17, seed=0)
    parts = [data.take_shard(drawn, i, 3) for i in range(3)]
    assert sorted(i for part in parts for i in part) == sorted(drawn) and sum(len(p) for p in parts) == 17
    assert data.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(BadInputError, match="--shard"):
            data.parse_shard(bad)


def test_batches_are_right_padded_and_sorted_by_length():
    examples = [data.Example([1] * n, [2] * n) for n in (3, 7, 5)]
    batches = list(data.make_batches(examples, 2, pad_id=0))
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 7), (1, 3)]
    first = batches[0]
    assert first["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0] * 2]
    assert first["labels"][1].tolist() == [2] * 5 + [data.IGNORE] * 2
    assert torch.equal(first["input_ids"][1, 5:], torch.zeros(2, dtype=torch.long))
