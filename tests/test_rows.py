"""Rows checked against their format's schema: the vectorized Arrow pass against the row-by-row check, the one label
rule, and which rows are read when."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest
from helpers import make_tokenizer, write_jsonl

from lorasb_cli import data
from lorasb_cli.errors import BadInputError
from lorasb_cli.schema import Schema

_TEXTS = ["a b", "", " ", "\t\n", None, "x\u3000", "\u3000", 7, 2.5, float("nan"), float("inf"), True, ["l"], {"o": 1}]
_MESSAGES = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "system", "content": ""},
    {"role": None, "content": "x"},
    {"role": "tool", "content": "x"},
    {"role": "assistant", "content": None},
    {"role": "assistant", "content": " \u3000"},
    None,
]


def _random_rows(fmt: str, first: dict, count: int, rng: random.Random) -> list[dict]:
    """`first`, then rows of `first`'s fields with values drawn from one Arrow type per field (as a column holds
    them), good and bad."""
    kinds = {
        "text": [v for v in _TEXTS if isinstance(v, str) or v is None],
        "number": [3, -1, None],
        "float": [1.5, float("nan"), float("inf"), -0.0, None],
        "label": ["earn", "crude", None],
    }
    pick = {name: kinds["number"] if isinstance(value, int) else kinds["text"] for name, value in first.items()}
    if "label" in first:
        pick["label"] = kinds["float"] if fmt == "regression" else kinds["label"]
    rows = [first]
    for _ in range(count - 1):
        if "messages" in first:
            rows.append({"messages": rng.choice([None, [rng.choice(_MESSAGES) for _ in range(rng.randint(0, 4))]])})
        else:
            rows.append({name: rng.choice(values) for name, values in pick.items()})
    return rows


FIRST_ROWS = [
    ("text", {"text": "a b"}),
    ("prompt-response", {"question": "q", "answer": "a"}),
    ("prompt-response", {"instruction": "i", "input": "x", "output": "o"}),
    ("prompt-response", {"query": 3, "response": "r"}),  # a column of numbers is text
    ("prompt-response", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}),
    ("classification", {"sentence1": "a", "sentence2": "b", "label": "earn"}),
    ("regression", {"text": "a", "label": 0.5}),
]


@pytest.mark.parametrize(("fmt", "first"), FIRST_ROWS, ids=[f"{f}-{'/'.join(r)}" for f, r in FIRST_ROWS])
def test_the_vectorized_arrow_check_finds_exactly_the_rows_the_row_check_refuses(fmt, first):
    """The reference is `Schema.problem` row by row; the table comes in chunks, some of them slices of others."""
    rows = _random_rows(fmt, first, 1500, random.Random(0))
    chunks = [pa.Table.from_pylist(rows[i : i + 200]) for i in range(0, len(rows), 200)]
    for table in (pa.concat_tables(chunks), pa.concat_tables([c.slice(17, 150) for c in chunks])):
        schema = Schema.of(fmt, first)
        refused = [i for i, row in enumerate(table.to_pylist()) if schema.problem(row)]
        assert 0 < len(refused) < table.num_rows
        assert schema.suspects(table).tolist() == refused


def test_a_column_of_a_type_no_text_has_makes_every_row_a_suspect():
    table = pa.Table.from_pylist([{"text": True}, {"text": False}])
    assert Schema.of("text", {"text": True}).suspects(table).tolist() == [0, 1]


def test_arrow_rows_are_checked_up_front_reading_only_the_suspects(tmp_path, monkeypatch):
    import datasets

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(2000)]
    rows[1500]["answer"] = " "
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    dataset = data.load_dataset_rows(str(tmp_path / "d.parquet"))
    read: list[int] = []
    get = data.RowView.__getitem__
    monkeypatch.setattr(data.RowView, "__getitem__", lambda self, i: read.append(i) or get(self, i))
    with pytest.raises(BadInputError, match=r"row 1501: field 'answer' is empty \(.*d.parquet\) — fix or drop the row"):
        data.checked(dataset, "prompt-response", every_row=False)
    assert read == [0, 1500]  # the first row gives the schema; the one suspect is the bad row


def test_rows_not_in_arrow_are_checked_up_front_or_as_they_are_read(tmp_path, monkeypatch):
    """A run that reads every row checks them before its first step, up to UP_FRONT_ROWS; past that, and for a
    stage that reads a sample, each row as it is read, named by its line (blank lines count) however sliced."""
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows[:3]) + "\n\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(BadInputError, match="line 5: lacks the field answer"):
        data.checked(data.load_dataset_rows(str(path)), "prompt-response")
    lazy = data.checked(data.load_dataset_rows(str(path)), "prompt-response", every_row=False)
    monkeypatch.setattr(data, "UP_FRONT_ROWS", 3)
    for checked in (lazy, data.checked(data.load_dataset_rows(str(path)), "prompt-response")):
        assert list(checked.rows[:3]) == rows[:3]
        with pytest.raises(BadInputError, match="line 5: lacks the field answer"):
            checked.rows[2:][1]


def test_classification_labels_follow_one_rule(tmp_path):
    """One type per file; the classes are the labels' text in the labels' order, integers by value."""
    tokenizer = make_tokenizer()
    integers = [{"text": "oil", "label": label} for label in (2, 10, 1, 10)]
    dataset = data.checked(data.load_dataset_rows(str(write_jsonl(tmp_path / "i.jsonl", integers))), "classification")
    labels = data.head_labels("classification", dataset.rows)
    assert labels == ["1", "2", "10"]
    examples = data.encode(list(dataset.rows), "classification", tokenizer, 16, labels)
    assert [e.label for e in examples] == [1, 2, 0, 2]
    booleans = [{"text": "oil", "label": label} for label in (True, False)]
    dataset = data.checked(data.load_dataset_rows(str(write_jsonl(tmp_path / "b.jsonl", booleans))), "classification")
    assert data.head_labels("classification", dataset.rows) == ["False", "True"]
    floats = [{"text": "oil", "label": 1.0}]
    with pytest.raises(BadInputError, match="label 1.0 is a float: classification labels are strings, integers or"):
        data.checked(data.load_dataset_rows(str(write_jsonl(tmp_path / "f.jsonl", floats))), "classification")


def test_a_json_column_of_mixed_text_and_numbers_is_text(tmp_path):
    """datasets holds such a column as JSON text and decodes each value as it is read ("4" comes back as 4): each
    row is checked as decoded, and a number is text."""
    rows = [{"question": "What is 1 plus 1?", "answer": 2}, {"question": "And 2 plus 2?", "answer": "4"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    dataset = data.checked(data.load_dataset_rows(str(tmp_path / "d.json")), "prompt-response")
    assert [str(row["answer"]) for row in dataset.rows] == ["2", "4"]


def test_an_eval_file_without_the_training_format_s_fields_is_named(tmp_path):
    dataset = data.load_dataset_rows(str(write_jsonl(tmp_path / "e.jsonl", [{"text": "the cat"}])))
    with pytest.raises(BadInputError, match="--format prompt-response: the first row lacks the fields it reads"):
        data.checked(dataset, "prompt-response")
