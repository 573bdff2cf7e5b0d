"""What a newcomer meets first: defaults that fit the model, one template for before and after, and what each
stage says it did."""

from __future__ import annotations

import json

import pytest
from helpers import CLASS_ROWS, make_bert_dir, write_jsonl

from lorasb_cli import artifacts, cli


def run(args: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


@pytest.fixture(scope="module")
def short_encoder(tmp_path_factory):
    """A 32-position BERT encoder and classification rows longer than 32 tokens."""
    folder = tmp_path_factory.mktemp("short-encoder")
    rows = [{"text": " ".join([row["text"]] * 12), "label": row["label"]} for row in CLASS_ROWS]
    return make_bert_dir(folder / "bert", positions=32), write_jsonl(folder / "long.jsonl", rows)


def test_every_default_max_length_fits_a_32_position_encoder(short_encoder, tmp_path, capsys):
    model, rows = short_encoder
    update, factors, run_dir = tmp_path / "u.safetensors", tmp_path / "f.safetensors", tmp_path / "run"
    code, _, err = run(
        ["estimate", "-m", model, "-d", rows, "--format", "classification", "--samples", 4, "-o", update], capsys
    )
    assert code == 0, err
    assert "--max-length 32" in err  # the cap is said
    assert artifacts.Artifact(update).meta["data"]["max_length"] == 32
    assert run(["decompose", update, "--rank", 2, "-q", "-o", factors], capsys)[0] == 0
    code, _, err = run(["train", "-m", model, "-f", factors, "-d", rows, "--max-steps", 2, "-q", "-o", run_dir], capsys)
    assert code == 0, err
    assert json.loads((run_dir / "adapter_config.json").read_text())["train"]["max_length"] == 32
    results = tmp_path / "results.json"
    code, _, err = run(
        ["evaluate", "-m", model, "-a", run_dir, "-t", "classification", "-d", rows, "-o", results], capsys
    )
    assert code == 0, err
    assert json.loads(results.read_text())["config"]["max_length"] == 32


@pytest.mark.parametrize("stage", ["estimate", "train", "evaluate"])
def test_an_explicit_max_length_past_the_model_is_refused(stage, short_encoder, tmp_path, capsys):
    model, rows = short_encoder
    args = {
        "estimate": ["--format", "classification", "--samples", 4],
        "train": ["--method", "head", "--max-steps", 1],
        "evaluate": ["-t", "classification"],
    }[stage]
    out = tmp_path / ("o.json" if stage == "evaluate" else "o")
    code, stdout, err = run([stage, "-m", model, "-d", rows, *args, "--max-length", 64, "-o", out], capsys)
    assert code == 2
    assert "--max-length 64 is beyond the 32 positions" in err and err.count("\n") == 1
    assert stdout == "" and not out.exists()


def test_frac_on_a_small_file_draws_min_samples_and_says_why(tiny_model_dir, tmp_path, capsys):
    from helpers import QA_ROWS

    rows = write_jsonl(tmp_path / "64.jsonl", [QA_ROWS[i % len(QA_ROWS)] for i in range(64)])
    update = tmp_path / "u.safetensors"
    code, _, err = run(["estimate", "-m", tiny_model_dir, "-d", rows, "-o", update], capsys)  # --frac 0.001
    assert code == 0, err
    assert artifacts.Artifact(update).meta["samples"] == 32
    assert "--frac 0.001 of 64 rows is 1, raised to --min-samples 32" in " ".join(err.split())
    # --samples is taken as given; a --min-samples past the rows draws every row.
    assert run(["estimate", "-m", tiny_model_dir, "-d", rows, "--samples", 3, "-q", "-o", update], capsys)[0] == 0
    assert artifacts.Artifact(update).meta["samples"] == 3
    assert run(["estimate", "-m", tiny_model_dir, "-d", rows, "--min-samples", 100, "-q", "-o", update], capsys)[0] == 0
    assert artifacts.Artifact(update).meta["samples"] == 64


def test_sample_count_floor():
    from lorasb_cli import data

    assert data.sample_count(100_000, frac=0.001, samples=None, min_samples=32)[0] == 100
    assert data.sample_count(5_000, frac=0.001, samples=None, min_samples=32)[0] == 32
    assert data.sample_count(20, frac=0.001, samples=None, min_samples=32) == (
        20,
        "--frac 0.001 of 20 rows is 1, raised to --min-samples 32 (every row)",
    )
    # The floored draw is the first rows of a larger one: raising the floor adds samples, never swaps them.
    small = data.sample_indices(500, frac=0.001, samples=None, seed=4, min_samples=8)
    assert data.sample_indices(500, frac=None, samples=20, seed=4)[:8] == small
