"""What the stages leave for others (issue 26): file modes a plain write gets under the user's umask, the output
path printed as it was given, summary tables that wrap instead of cutting, and `inspect` naming what a file is."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl
from rich.console import Console

from lorasb_cli import artifacts, bundled, console, files
from lorasb_cli.cli import main
from lorasb_cli.errors import BadInputError

# Runs CLI argvs in one process (one import of torch for all of them); prints [[exit status, stdout], ...] as JSON.
# Then, where mistral-common is installed, converts its tokenizer into $LORASB_HOME: bundled.py's atomic cache folder.
RUNNER = """
import contextlib, io, json, sys
from lorasb_cli import bundled
from lorasb_cli.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            main(argv)
        except SystemExit as e:
            results.append([e.code, printed.getvalue()])
if bundled.source_path(bundled.MISTRAL_TOKENIZER) is not None:
    bundled.mistral_tokenizer_dir()
json.dump(results, sys.stdout)
"""


def _stages(model: Path, qa: Path, peft: Path) -> list[tuple[list[str], str]]:
    """(argv, what it must print): every stage, run in the output folder. Relative -o as given, a default -o as its
    default name, an absolute -o absolute; merge re-shards, so the shard writer and its index are covered too.
    estimate and train show their summaries (the others are quiet)."""
    m, d = str(model), str(qa)
    return [
        (["data", "arithmetic", "--size", "8", "-q"], "arithmetic-train.jsonl"),
        (["data", "arithmetic", "--split", "test", "--size", "4", "-q", "-o", "data/test.jsonl"], "data/test.jsonl"),
        (["estimate", "-m", m, "-d", d, "--samples", "4"], "update.safetensors"),
        (["decompose", "update.safetensors", "-r", "2", "-q", "-o", "factors/f.safetensors"], "factors/f.safetensors"),
        (
            ["train", "-m", m, "-f", "factors/f.safetensors", "-d", d, "--max-steps", "2", "--save-steps", "1"]
            + ["-o", "runs/run"],
            "runs/run",
        ),
        (["merge", "-a", "runs/run", "--max-shard-size", "100KB", "-q", "-o", "merged"], "merged"),
        (["merge", "-a", "runs/run", "--format", "peft", "-q", "-o", str(peft)], str(peft)),
        (
            ["evaluate", "-m", m, "-a", "runs/run", "-t", "perplexity", "-d", d, "--limit", "2", "-q"]
            + ["-o", "eval/results.json"],
            "eval/results.json",
        ),
        (["inspect", "update.safetensors", "--plot", "plots/spectrum.png"], "plots/spectrum.png"),
        (
            ["compare", "-m", m, "-d", "arithmetic", "--size", "8", "--eval-size", "4", "-t", "perplexity"]
            + ["--methods", "lorasb", "--ranks", "2", "--seeds", "1", "--max-steps", "1", "--samples", "4"]
            + ["--batch-size", "4", "-q", "-o", "report"],
            "report/results.md",
        ),
    ]


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask-022", "umask-077"])
def test_every_output_gets_the_modes_a_plain_write_gets_and_each_stage_prints_its_o_as_given(
    tiny_model_dir, qa_file, tmp_path, umask
):
    out = tmp_path / "out"
    out.mkdir()
    stages = _stages(tiny_model_dir, qa_file, out / "exports" / "peft")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORASB_HOME": str(out / "home"), "OMP_NUM_THREADS": "1"}
    argvs = json.dumps([argv for argv, _ in stages])
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, argvs],
        cwd=out,
        env=env,
        umask=umask,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert [status for status, _ in results] == [0] * len(stages), done.stderr
    assert [printed for _, printed in results] == [f"{expected}\n" for _, expected in stages]
    # The summaries, drawn at 80 columns as rich does off a terminal, say which peak is which and cut nothing.
    assert (
        done.stderr.count("measured peak (process RSS)") == 2 and "planned peak (lorasb's memory plan)" in done.stderr
    )
    assert "…" not in done.stderr

    if bundled.source_path(bundled.MISTRAL_TOKENIZER) is not None:
        assert list((out / "home" / "tokenizers").glob("mistral-7b-v0.1-*/tokenizer.json"))
    assert (out / "merged" / "model.safetensors.index.json").is_file()  # re-sharded: ShardWriter and write_index
    assert list((out / "runs" / "run").glob("checkpoint-*/optimizer.pt"))  # the Trainer's own checkpoint files
    want = {"file": 0o666 & ~umask, "folder": 0o777 & ~umask}
    wrong = {}
    for path in out.rglob("*"):  # `out` itself is the test's
        kind = "folder" if path.is_dir() else "file"
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode != want[kind]:
            wrong[str(path.relative_to(out))] = oct(mode)
    assert wrong == {}, f"want {oct(want['file'])} / {oct(want['folder'])}"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


def test_plain_modes_follow_the_umask_of_the_moment(tmp_path):
    """`plain_modes` reads the umask each time (not once at import), and leaves symbolic links alone."""
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "weights").write_bytes(b"x")
    os.chmod(tmp_path / "tree" / "sub" / "weights", 0o600)
    (tmp_path / "tree" / "link").symlink_to("/etc/hostname")
    before = os.umask(0o027)
    try:
        assert files.current_umask() == 0o027
        files.plain_modes(tmp_path / "tree")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "tree").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "tree" / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "tree" / "sub" / "weights").stat().st_mode) == 0o640
    assert files.current_umask() == before


def test_an_atomic_folder_is_refused_when_its_target_filled_up_meanwhile_and_replaced_only_when_asked(tmp_path):
    target = tmp_path / "out"
    refused = pytest.raises(BadInputError, match="output directory exists and is not empty")
    with refused, files.atomic_folder(target, hint="pick another") as staging:
        (staging / "new").write_text("new")
        target.mkdir()
        (target / "old").write_text("old")  # another writer got there first
    assert [p.name for p in target.iterdir()] == ["old"]
    with files.atomic_folder(target, replace=True) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old folder left


def test_models_lists_the_folder_each_alias_loads_from(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from lorasb_cli import models

    snapshot = tmp_path / "hub" / "models--mistralai--Mistral-7B-v0.1" / "snapshots" / "0123"
    cached = {"mistralai/Mistral-7B-v0.1": snapshot}
    monkeypatch.setattr(
        huggingface_hub,
        "try_to_load_from_cache",
        lambda repo_id, filename: str(cached[repo_id] / filename) if repo_id in cached else None,
    )
    monkeypatch.setenv("LORASB_HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as excinfo:
        main(["models", "--json"])
    rows = {row["alias"]: row for row in json.loads(capsys.readouterr().out)}
    assert excinfo.value.code == 0
    assert rows["mistral"]["path"] == str(snapshot) and rows["mistral"]["offline"] == "yes (in the HF cache)"
    assert rows["gemma2-9b"]["path"] is None and rows["gemma2-9b"]["offline"].startswith("no: first use downloads")
    if bundled.source_path(bundled.BUNDLED["minilm-l6"]) is not None:
        assert (
            rows["minilm-l6"]["path"] == models.resolve_model("minilm-l6").path
            and rows["minilm-l6"]["offline"] == "yes"
        )
    if bundled.source_path(bundled.BUNDLED["smollm2-135m"]) is not None:  # converted on first use: not here yet
        assert Path(rows["smollm2-135m"]["path"]).parent == tmp_path / "home" / "models"
        assert rows["smollm2-135m"]["offline"] == "yes (converted into path on first use)"


# --- tables ---------------------------------------------------------------------------------------------------------


LONG_MODULE = "bert.encoder.layer.*.attention.self.query"


@pytest.mark.parametrize("width", [40, 80, 250])
def test_tables_and_summaries_wrap_and_never_cut(monkeypatch, width):
    screen = io.StringIO()
    monkeypatch.setattr(console, "stderr", Console(file=screen, force_terminal=True, width=width, color_system=None))
    monkeypatch.setattr(console, "_quiet", False)
    console.print_table(
        "captured energy Σσ²(top r) / Σσ²",
        ["modules", "count", "r", "mean", "min", "max"],
        [[LONG_MODULE, 2, 8, "0.512", "0.500", "0.524"], ["classifier", 1, 8, "0.9", "0.9", "0.9"]],
    )
    fields = [
        ("modules", 210),
        ("measured peak (process RSS)", "1.62 GiB"),
        ("planned peak (lorasb's memory plan)", "5.81 GiB on cpu, 3.20 GiB on cuda:0"),
        ("accumulators", "float32 on cpu"),
    ]
    console.print_summary("estimate", fields)
    lines = screen.getvalue().splitlines()
    assert "…" not in "".join(lines)
    assert all(len(line) <= width for line in lines)
    # A folded cell continues down its column: joined back, every label and value is whole.
    columns = "".join(line.split("│")[1].strip() for line in lines if line.count("│") >= 2)
    assert LONG_MODULE in columns
    assert all(label.replace(" ", "") in columns.replace(" ", "") for label, _ in fields)


@pytest.mark.parametrize("width", [40, 80, 250])
def test_inspect_on_a_terminal_wraps_and_never_cuts(update_file, monkeypatch, width):
    from lorasb_cli import inspect

    screen = io.StringIO()
    monkeypatch.setattr(console, "stdout", Console(file=screen, force_terminal=True, width=width, color_system=None))
    description = inspect.describe(update_file)
    console.print_description(description)
    lines = screen.getvalue().splitlines()
    assert "…" not in "".join(lines) and all(len(line) <= width for line in lines)
    cells = "".join(line.split("│")[1].strip() for line in lines if line.count("│") >= 2)
    assert "model.layers.*.self_attn.q_proj" in cells and "fingerprint" in cells


# --- inspect on what is no artifact ---------------------------------------------------------------------------------


def _files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """{case: (file, what the error must call it)}."""
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"task": "gsm8k", "metrics": {"exact_match": 0.5}, "count": 2}, indent=2))
    other = tmp_path / "settings.json"
    other.write_text(json.dumps({"colour": "blue"}))
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}] * 3)
    text = tmp_path / "notes.txt"
    text.write_text("lorasb notes\nnothing to see\n")
    pickled = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2)}, pickled)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    return {
        "evaluate results": (results, "the results JSON of lorasb evaluate"),
        "json": (other, "a JSON object"),
        "jsonl": (rows, "JSON Lines"),
        "text": (text, "a text file"),
        "pickle": (pickled, "a zip archive, as PyTorch .bin/.pt checkpoints are"),
        "empty": (empty, "an empty file"),
    }


@pytest.mark.parametrize("case", ["evaluate results", "json", "jsonl", "text", "pickle", "empty"])
def test_inspect_names_what_a_non_artifact_is(tmp_path, capsys, case):
    path, what = _files(tmp_path)[case]
    with pytest.raises(SystemExit) as excinfo:
        main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert excinfo.value.code == 2 and out == ""
    assert err.startswith(f"Error: not a lorasb artifact (safetensors) but {what}") and str(path) in err
    assert "truncated" not in err and "written by lorasb estimate, decompose or train" in err


def test_a_stage_names_the_artifact_it_wanted_and_a_cut_file_is_still_called_truncated(update_file, tmp_path):
    path, _ = _files(tmp_path)["evaluate results"]
    with pytest.raises(
        BadInputError, match=r"but the results JSON of lorasb evaluate .* pass the file written by lorasb train"
    ):
        artifacts.Artifact(path, kinds=("adapter", "factors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(update_file.read_bytes()[:-64])
    with pytest.raises(BadInputError, match="not a readable safetensors file .* truncated or damaged"):
        artifacts.Artifact(cut, kinds=("update",))


@pytest.fixture()
def update_file(tiny_model_dir, qa_file, tmp_path_factory) -> Path:
    from lorasb_cli import estimate

    out = tmp_path_factory.mktemp("update") / "u.safetensors"
    estimate.estimate(estimate.EstimateConfig(model=str(tiny_model_dir), data=str(qa_file), out=str(out), samples=2))
    return out
