"""Off the happy path: each root cause of a fault gets one row, run through the real entry point. Every row must
end in exit 2 with one `Error:` line naming no Python exception, write no output and change no input."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import artifact_meta, make_llama, save_model
from safetensors.torch import load_file, save_file

from lorasb_cli import cli, files


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _drop_weight(model_dir: Path, name: str) -> None:
    weights = load_file(model_dir / "model.safetensors")
    del weights[name]
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})


def _more_layers_in_config(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))


def _other_vocab_in_config(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] + 7}))


# (case, how the base is damaged, what the one error line says)
BROKEN_BASES = [
    (
        "missing-weight",
        lambda d: _drop_weight(d, "model.layers.1.mlp.down_proj.weight"),
        "lacks weights: model.layers.1.mlp.down_proj.weight",
    ),
    ("config-layers-past-weights", _more_layers_in_config, "lacks weights: model.layers.2."),
    ("config-vocab-not-the-weights", _other_vocab_in_config, "weights"),
]


@pytest.mark.parametrize("stage", ["estimate", "train", "evaluate"])
@pytest.mark.parametrize(("case", "damage", "message"), BROKEN_BASES, ids=[c[0] for c in BROKEN_BASES])
def test_an_incomplete_base_is_refused_not_filled_with_random_weights(
    stage, case, damage, message, qa_file, tmp_path, capsys
):
    model, tokenizer = make_llama()
    base = save_model(model, tokenizer, tmp_path / "base")
    damage(base)
    before = _snapshot(base)
    capsys.readouterr()  # what building the base printed
    out = tmp_path / ("out.json" if stage == "evaluate" else "out")
    args = {
        "estimate": ["--samples", 4],
        "train": ["--method", "lora", "--rank", 2, "--max-steps", 1],
        "evaluate": ["-t", "perplexity", "--limit", 2],
    }[stage]
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in [stage, "-m", base, "-d", qa_file, *args, "-q", "-o", out]])
    stdout, err = capsys.readouterr()
    assert excinfo.value.code == 2, err
    assert err.startswith("Error: ") and err.count("\n") == 1 and message in err
    assert "Error: RuntimeError" not in err and stdout == ""
    assert not out.exists() and _snapshot(base) == before


@pytest.mark.parametrize(
    ("stage", "args"), [("estimate", ["--samples", 4]), ("train", ["--method", "lora", "--rank", 2])]
)
def test_nothing_to_learn_is_refused(stage, args, tiny_model_dir, qa_file, tmp_path, capsys):
    """At --max-length 2 no answer token fits: an all-zero update or a loss of 0.0 is no success."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        cli.main(
            [str(a) for a in [stage, "-m", tiny_model_dir, "-d", qa_file, *args, "--max-length", 2, "-q", "-o", out]]
        )
    err = capsys.readouterr()[1]
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert excinfo.value.code == 2 and len(errors) == 1 and err.splitlines()[-1] == errors[0]
    assert "no supervised token within --max-length 2" in errors[0]
    assert not out.exists()


# (command line, what the one error line says): every numeric option has a declared range, checked while parsing
NUMBERS = [
    (["train", "--seed", str(2**70)], "is not in the range 0<=x<=4294967295"),
    (["train", "--seed", "-1"], "is not in the range 0<=x<=4294967295"),
    (["train", "--epochs", "inf"], "'inf' is not a finite number"),
    (["train", "--lr", "inf"], "'inf' is not a finite number"),
    (["train", "--lr", "nan"], "'nan' is not a finite number"),
    (["train", "--max-steps", "-5"], "is not in the range x>=-1"),
    (["train", "--eval-steps", "0"], "is not in the range x>=1"),
    (["train", "-f", "f.safetensors", "--init-scale", "-1"], "--init-scale -1 must be a finite number > 0 or auto"),
    (["decompose", "u.safetensors", "--budget-ratio", "nan"], "'nan' is not a finite number"),
    (["estimate", "--eta", "1e39"], "is not in the range 1e-20<=x<=1"),
    (["estimate", "--eta", "1e-320"], "is not in the range 1e-20<=x<=1"),
    (["data", "arithmetic", "--size", "0"], "is not in the range x>=1"),
]


@pytest.mark.parametrize(("args", "message"), NUMBERS, ids=[" ".join(a[:3]) for a, _ in NUMBERS])
def test_numbers_outside_their_declared_range_are_refused(args, message, tiny_model_dir, qa_file, tmp_path, capsys):
    needs = {"train": ["-m", tiny_model_dir, "-d", qa_file], "estimate": ["-m", tiny_model_dir, "-d", qa_file]}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        cli.main([*args, *map(str, needs.get(args[0], [])), "-q", "-o", str(out)])
    err = capsys.readouterr()[1]
    assert excinfo.value.code == 2 and err.startswith("Error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_ranges_hold_for_configs_built_in_python_and_show_in_help(capsys):
    from lorasb_cli.configs import TrainConfig
    from lorasb_cli.errors import BadInputError

    with pytest.raises(BadInputError, match=r"--warmup-ratio 1.0 must be a finite number in \[0, 1\)"):
        TrainConfig.from_options(model="m", data="d", out="o", warmup_ratio=1.0)
    with pytest.raises(BadInputError, match="--lr nan must be a finite number > 0"):
        TrainConfig.from_options(model="m", data="d", out="o", lr=float("nan"))
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "0<=x<1" in " ".join(capsys.readouterr()[0].split())  # --warmup-ratio's range in the help


def _train_args(model, data, factors, out, *more):
    return [
        "train",
        "-m",
        model,
        "-d",
        data,
        "-f",
        factors,
        "--max-steps",
        4,
        "--save-steps",
        2,
        *more,
        "-q",
        "-o",
        out,
    ]


def test_overwrite_replaces_a_run_only_once_the_new_one_finished(tiny_model_dir, qa_file, factors_file, tmp_path):
    """A finished run, then --overwrite whose run fails mid-way (after a checkpoint): the old run is as it was, and
    nothing of the new one is left; a new run that finishes replaces it."""
    from transformers import TrainerCallback

    from lorasb_cli import train
    from lorasb_cli.errors import RunFailure

    out = tmp_path / "run"
    config = train.TrainConfig.from_options(
        model=str(tiny_model_dir), data=str(qa_file), factors=str(factors_file), out=str(out), max_steps=4, save_steps=2
    )
    train.train(config)
    before = _snapshot(out)

    class FailAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RunFailure("the data went bad at step 3")

    overwrite = dataclasses.replace(config, overwrite=True, lr=0.5)
    with pytest.raises(RunFailure) as excinfo:
        train.train(overwrite, callbacks=[FailAtStep3()])
    assert f"the run in {out} is as it was" in str(excinfo.value)
    assert _snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    summary = train.train(overwrite)
    assert _snapshot(out) != before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    recorded = json.loads((out / "adapter_config.json").read_text())
    assert recorded["train"]["lr"] == 0.5 and summary.path == out
    assert json.loads((out / "metrics.json").read_text())["path"] == str(out)
    assert oct((out / "adapter.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_overwrite_of_a_folder_that_is_no_run_is_refused(tiny_model_dir, qa_file, factors_file, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as excinfo:
        cli.main(list(map(str, _train_args(tiny_model_dir, qa_file, factors_file, out, "--overwrite"))))
    err = capsys.readouterr()[1]
    assert excinfo.value.code == 2 and "--overwrite replaces a run of lorasb train" in err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(SystemExit) as excinfo:
        cli.main(list(map(str, _train_args(tiny_model_dir, qa_file, factors_file, out, "--overwrite", "--resume"))))
    assert excinfo.value.code == 2 and "pass one of them" in capsys.readouterr()[1]


def _special_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a socket and (where this process may make one) a character device like /dev/null."""
    import socket
    import stat

    nodes = {"FIFO": folder / "fifo"}
    os.mkfifo(nodes["FIFO"])
    nodes["socket"] = folder / "sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(nodes["socket"]))
    server.close()
    try:
        os.mknod(folder / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        nodes["character device"] = folder / "null"
    except (PermissionError, OSError):
        pass
    return nodes


@pytest.mark.parametrize("stage", ["estimate", "decompose", "evaluate", "data", "inspect"])
def test_an_output_that_is_a_special_file_is_refused_and_left_as_it_is(
    stage, tiny_model_dir, qa_file, factors_file, tmp_path, capsys
):
    update = factors_file.parent / "u.safetensors"
    commands = {
        "estimate": ["estimate", "-m", tiny_model_dir, "-d", qa_file, "--samples", 2],
        "decompose": ["decompose", update, "--rank", 2],
        "evaluate": ["evaluate", "-m", tiny_model_dir, "-t", "perplexity", "-d", qa_file, "--limit", 2],
        "data": ["data", "arithmetic", "--size", 2],
        "inspect": ["inspect", update, "--plot"],
    }
    for kind, node in _special_files(tmp_path).items():
        mode = node.lstat().st_mode
        with pytest.raises(SystemExit) as excinfo:
            cli.main(
                [str(a) for a in commands[stage]] + ([str(node)] if stage == "inspect" else ["-q", "-o", str(node)])
            )
        err = capsys.readouterr()[1]
        assert excinfo.value.code == 2 and f"output path is a {kind}" in err and err.count("\n") == 1, err
        assert node.lstat().st_mode == mode  # still the node it was, not a regular file


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A checkpoint of the same architecture as tiny_model_dir with other weights (another seed)."""
    model, tokenizer = make_llama(seed=1)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("other-base"))


def test_an_artifact_is_applied_only_to_the_weights_it_was_made_on(
    other_base, tiny_model_dir, qa_file, factors_file, tmp_path, capsys
):
    """Factors and adapters record the weights digest of their base: another checkpoint of the same shapes is
    refused by train, evaluate and merge, naming both, unless --force-base."""
    commands = {
        "train": ["train", "-f", factors_file, "-d", qa_file, "--max-steps", 1, "-o", tmp_path / "run"],
        "evaluate": ["evaluate", "-a", factors_file, "-t", "perplexity", "-d", qa_file, "-o", tmp_path / "r.json"],
        "merge": ["merge", "-a", factors_file, "-o", tmp_path / "merged"],
    }
    capsys.readouterr()
    for args in commands.values():
        with pytest.raises(SystemExit) as excinfo:
            cli.main([str(a) for a in [*args, "-m", other_base, "-q"]])
        err = capsys.readouterr()[1]
        assert excinfo.value.code == 2 and err.count("\n") == 1, err
        assert (
            f"was made on other weights ({tiny_model_dir}) than model '{other_base}'" in err and "--force-base" in err
        )
        assert not Path(args[-1]).exists()
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in [*commands["evaluate"], "-m", other_base, "-q", "--force-base"]])
    assert excinfo.value.code == 0


def test_an_adapter_is_never_merged_twice(tiny_model_dir, factors_file, tmp_path, capsys):
    merged = tmp_path / "merged"
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in ["merge", "-a", factors_file, "-q", "-o", merged]])
    assert excinfo.value.code == 0
    before = _snapshot(merged)
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        cli.main(
            [
                str(a)
                for a in ["merge", "-a", factors_file, "-m", merged, "--force-base", "-q", "-o", tmp_path / "twice"]
            ]
        )
    err = capsys.readouterr()[1]
    assert excinfo.value.code == 2 and "already has this adapter merged into it" in err
    assert _snapshot(merged) == before and not (tmp_path / "twice").exists()


def _rewrite(src: Path, dst: Path, change) -> Path:
    """`src`'s factors with `change(tensors)` applied, written by lorasb's own writer (so every hash is recomputed:
    only the schema can tell)."""
    from lorasb_cli import artifacts

    art = artifacts.Artifact(src)
    tensors = {name: art.get(name) for name in art.names}
    meta = {k: v for k, v in art.fields.items() if k not in ("tensor_sha256", "metadata_sha256", "kind")}
    artifacts.write_artifact(dst, change(tensors), artifact_meta(art.kind, **meta))
    return dst


@pytest.mark.parametrize(
    ("case", "change", "message"),
    [
        ("extra tensor", lambda t: {**t, "junk.extra": torch.ones(3)}, "unexpected tensor 'junk.extra'"),
        (
            "R as int64",
            lambda t: {k: v.to(torch.int64) if k.endswith("lora_R") else v for k, v in t.items()},
            "is int64, not floating point",
        ),
    ],
)
def test_factors_with_what_no_stage_writes_are_refused(
    case, change, message, tiny_model_dir, qa_file, factors_file, tmp_path, capsys
):
    forged = _rewrite(factors_file, tmp_path / "forged.safetensors", change)
    for args in (
        ["train", "-m", tiny_model_dir, "-f", forged, "-d", qa_file, "--max-steps", 1, "-o", tmp_path / "run"],
        ["merge", "-a", forged, "-m", tiny_model_dir, "-o", tmp_path / "merged"],
    ):
        with pytest.raises(SystemExit) as excinfo:
            cli.main([str(a) for a in [*args, "-q"]])
        err = capsys.readouterr()[1]
        assert excinfo.value.code == 2 and message in err and err.count("\n") == 1, err
        assert not Path(args[-1]).exists()


@contextlib.contextmanager
def _mounted(folder: Path, options: str):
    """A tmpfs at `folder` with mount `options` (e.g. `ro`, `size=8k`); skips where this machine cannot mount."""
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=False, capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# A 4k tmpfs holds one page: one small file, never the two of evaluate, nor an artifact or a checkpoint.
@pytest.mark.parametrize(("storage", "why"), [("ro", "read-only file system"), ("size=4k", "no space left")])
@pytest.mark.parametrize("stage", ["estimate", "decompose", "evaluate", "train"])
def test_storage_that_fails_a_write_is_one_error_and_leaves_nothing(
    stage, storage, why, tiny_model_dir, qa_file, factors_file, tmp_path, capsys
):
    update = factors_file.parent / "u.safetensors"
    with _mounted(tmp_path / "mnt", storage) as mnt:
        out = mnt / ("results.json" if stage == "evaluate" else "out")
        args = {
            "estimate": ["estimate", "-m", tiny_model_dir, "-d", qa_file, "--samples", 2],
            "decompose": ["decompose", update, "--rank", 4],
            "evaluate": ["evaluate", "-m", tiny_model_dir, "-t", "perplexity", "-d", qa_file, "--limit", 2],
            "train": ["train", "-m", tiny_model_dir, "-f", factors_file, "-d", qa_file, "--max-steps", 2],
        }[stage]
        capsys.readouterr()
        with pytest.raises(SystemExit) as excinfo:
            more = ["--save-steps", 1] if stage == "train" else []  # a checkpoint before the final adapter
            cli.main([str(a) for a in [*args, *more, "-q", "-o", out]])
        err = capsys.readouterr()[1]
        assert excinfo.value.code == 2 and err.startswith("Error: cannot write ") and why in err, err
        assert err.count("\n") == 1 and "Errno" not in err
        assert list(mnt.iterdir()) == []  # no output, no temp file, no half a checkpoint


class _Payload:
    """What a malicious pickle carries: a call made while unpickling (here a harmless print)."""

    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_unreadable_base_weights_are_one_line_in_every_stage(tiny_model_dir, qa_file, factors_file, tmp_path, capsys):
    import pickle
    import shutil

    truncated = shutil.copytree(tiny_model_dir, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    pickled = shutil.copytree(tiny_model_dir, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload()}))
    cases = [
        (["train", "-m", truncated, "-f", factors_file, "-d", qa_file], "weights are unreadable"),
        (["estimate", "-m", truncated, "-d", qa_file], "weights are unreadable"),
        (["estimate", "-m", pickled, "-d", qa_file, "--allow-pickle"], "pickle weights hold code or objects"),
    ]
    capsys.readouterr()
    for args, message in cases:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as excinfo:
            cli.main([str(a) for a in [*args, "-q", "-o", out]])
        stdout, err = capsys.readouterr()
        assert excinfo.value.code == 2 and message in err and err.count("\n") == 1, err
        assert "unpickled code ran" not in stdout + err and not out.exists()


# --- rows: every row a stage reads is checked against its format's schema (issue 27.10, 27.12, 27.14, 27.15) -----

_ROWS_CHAT = [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3"}]
_ROWS_QA = [{"question": f"What is {i} plus 1?", "answer": f"{i} plus 1 is {i + 1}"} for i in range(6)]


def _rows_write(path: Path, rows) -> Path:
    """`rows` as `path`: a .jsonl (NaN written as JSON's NaN), .json array or .parquet file; a str is the raw text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(rows, str):
        path.write_text(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def _rows_chat(*turns) -> dict:
    return {"messages": [_ROWS_CHAT[0], *turns]}


def _rows_labels(*labels) -> list[dict]:
    return [{"text": f"the oil company said {i}", "label": label} for i, label in enumerate(labels)]


# (case, stage, data file, its rows, what the one error line says after the file's name). By root cause: a field
# of the wrong type or empty; a file holding two kinds of rows; labels outside the one label rule; a file that
# cannot be read as its suffix says.
BAD_ROWS = [
    (
        "chat-null-content",
        "train",
        "c.jsonl",
        [_rows_chat(_ROWS_CHAT[1]), {"messages": [{"role": "user", "content": None}, _ROWS_CHAT[1]]}],
        "line 2: messages[0]'s content is null",
    ),
    (
        "chat-object-content",
        "train",
        "c.jsonl",
        [_rows_chat(_ROWS_CHAT[1]), _rows_chat({"role": "assistant", "content": {"x": 1}})],
        "line 2: messages[1]'s content must be text, not an object ({'x': 1})",
    ),
    (
        "chat-blank-assistant",
        "train",
        "c.jsonl",
        [_rows_chat(_ROWS_CHAT[1]), _rows_chat({"role": "assistant", "content": " "})],
        "line 2: the assistant's last turn (messages[1]) is empty",
    ),
    (
        "chat-no-role",
        "train",
        "c.jsonl",
        [_rows_chat(_ROWS_CHAT[1]), _rows_chat({"content": "3"})],
        "line 2: messages[1] has no role",
    ),
    (
        "chat-blank-assistant-arrow",
        "train",
        "c.parquet",
        [_rows_chat(_ROWS_CHAT[1])] * 3 + [_rows_chat({"role": "assistant", "content": ""})],
        "row 4: the assistant's last turn (messages[1]) is empty",
    ),
    (
        "answer-nan",
        "train",
        "qa.jsonl",
        [*_ROWS_QA, {"question": "q", "answer": float("nan")}],
        "line 7: field 'answer' is NaN",
    ),
    (
        "answer-nan-estimate",
        "estimate",
        "qa.jsonl",
        [{"question": "q", "answer": float("nan")}, *_ROWS_QA],
        "line 1: field 'answer' is NaN",
    ),
    (
        "question-list",
        "train",
        "qa.jsonl",
        [*_ROWS_QA, {"question": ["q"], "answer": "a"}],
        "line 7: field 'question' must be text, not a list",
    ),
    (
        "text-object",
        "train",
        "t.jsonl",
        [{"text": "the cat sat"}, {"text": {"x": 1}}],
        "line 2: field 'text' must be text, not an object",
    ),
    (
        "text-object-arrow",
        "train",
        "t.json",
        [{"text": "the cat sat"}, {"text": {"x": 1}}],
        "row 2: field 'text' must be text, not an object",
    ),
    ("text-blank", "train", "t.jsonl", [{"text": "the cat sat"}, {"text": "  "}], "line 2: field 'text' is empty"),
    (
        "last-of-256-rows",
        "train",
        "qa.jsonl",
        _ROWS_QA * 42 + [*_ROWS_QA[:3], {"question": "q", "answer": None}],
        "line 256: field 'answer' is null",
    ),
    (
        "two-kinds-of-row",
        "train",
        "qa.jsonl",
        [*_ROWS_QA, {"prompt": "p", "completion": "c"}],
        "line 7: lacks the fields question, answer that its file's first row has",
    ),
    (
        "two-kinds-in-a-row",
        "train",
        "qa.jsonl",
        [*_ROWS_QA, {**_ROWS_QA[0], "query": "q", "response": "r"}],
        "line 7: has the fields query/response as well as question/answer",
    ),
    (
        "two-kinds-arrow",
        "train",
        "qa.json",
        [*_ROWS_QA, {"prompt": "p", "completion": "c"}],
        "row 7: field 'question' is null",
    ),
    (
        "labels-int-and-str",
        "train",
        "l.jsonl",
        _rows_labels(1, "1", 0),
        "line 2: label '1' is a string, but this file's labels are integers",
    ),
    (
        "labels-int-and-float",
        "train",
        "l.jsonl",
        _rows_labels(1, 0, 1.0),
        "line 3: label 1.0 is a float, but this file's labels are integers",
    ),
    ("labels-int-and-bool", "train", "l.jsonl", _rows_labels(1, 0, True), "line 3: label True is a boolean"),
    ("label-null", "train", "l.jsonl", _rows_labels("earn", None), "line 2: label is null"),
    ("labels-mixed-arrow", "train", "l.json", _rows_labels(1, "1", 0, "0"), "the labels mix types"),
    ("regression-label-nan", "train", "s.jsonl", _rows_labels(0.5, 1.5, float("nan")), "line 3: label is NaN"),
    (
        "nested-200000-deep",
        "train",
        "qa.jsonl",
        json.dumps(_ROWS_QA[0]) + "\n" + '{"question": "q", "answer": ' + "[" * 200_000 + "]" * 200_000 + "}\n",
        "line 2 nests deeper than the JSON reader can follow",
    ),
    (
        "not-json-after-a-blank-line",
        "estimate",
        "qa.jsonl",
        json.dumps(_ROWS_QA[0]) + "\n\n{not json\n",
        "line 3 is not JSON",
    ),
    ("csv-ragged", "train", "qa.csv", "question,answer\nq,a\nq,a,b,c\n", "Expected 2 fields in line 3, saw 4"),
]


@pytest.mark.parametrize(("case", "stage", "name", "rows", "message"), BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_a_bad_row_is_refused_naming_its_file_and_row(
    case, stage, name, rows, message, tiny_model_dir, tmp_path, capsys
):
    data_file = _rows_write(tmp_path / "in" / name, rows)
    before = _snapshot(data_file.parent)
    out = tmp_path / ("u.safetensors" if stage == "estimate" else "run")
    args = {"train": ["--method", "lora", "--rank", 2, "--max-steps", 2, "--save-steps", 1], "estimate": []}[stage]
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in [stage, "-m", tiny_model_dir, "-d", data_file, *args, "-q", "-o", out]])
    stdout, err = capsys.readouterr()
    assert excinfo.value.code == 2 and stdout == "" and err.startswith("Error: ") and err.count("\n") == 1, err
    assert message in err and f"({data_file})" in err, err  # the problem, with the file named
    assert "float32" not in err and "Traceback" not in err and not err.startswith(("Error: Recursion", "Error: Value"))
    assert not out.exists() and _snapshot(data_file.parent) == before  # refused before the first step: no checkpoint


# (compare options, what the one error line says): refused before any folder is made
COMPARE_REFUSALS = [
    (["--methods", "lora:0"], "cell lora-r0-lr0.001-s0: --rank 0 must be a finite number ≥ 1"),
    (["--methods", "lora", "--ranks", "0"], "cell lora-r0-lr0.001-s0: --rank 0"),
    (["--methods", "lorasb:0"], "cell lorasb-r0-lr0.001-s0: --rank 0"),
    (["--methods", "lora:2", "--lr", "lora=0,1e-3"], "cell lora-r2-lr0-s0: --lr 0.0 must be a finite number > 0"),
    (["--methods", "noisy:2"], "--init noisy needs --noise-std"),
    (["--methods", "lora:2", "--samples", "0"], "'--samples': 0 is not in the range x>=1"),
    (["--methods", "lora:2", "-d", "{bad}"], "line 3: field 'answer' is null"),  # met in the first cell
]


@pytest.mark.parametrize(("args", "message"), COMPARE_REFUSALS, ids=[" ".join(a[:4]) for a, _ in COMPARE_REFUSALS])
def test_a_refused_compare_leaves_no_folder(args, message, tiny_model_dir, qa_file, tmp_path, capsys):
    bad = _rows_write(tmp_path / "bad.jsonl", [*_ROWS_QA[:2], {"question": "q", "answer": None}])
    out = tmp_path / "grid"
    common = ["compare", "-m", tiny_model_dir, "-d", qa_file, "--eval-data", qa_file, "-t", "gsm8k", "--max-steps", 1]
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a).replace("{bad}", str(bad)) for a in [*common, *args, "-q", "-o", out]])
    err = capsys.readouterr()[1]
    assert excinfo.value.code == 2 and err.startswith("Error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_a_second_merge_into_one_output_is_refused_while_the_first_runs(factors_file, tmp_path, capsys):
    """It would have taken the running merge's staging folder for a killed one's and deleted it."""

    target = tmp_path / "merged"
    with files.output_lock(tmp_path / ".merged.lorasb.lock", "lorasb merge", target):
        staging = tmp_path / ".merged.tmp-running"
        staging.mkdir()
        with pytest.raises(SystemExit) as excinfo:
            cli.main([str(a) for a in ["merge", "-a", factors_file, "-q", "-o", target]])
        assert excinfo.value.code == 2 and "another lorasb merge is writing into this folder" in capsys.readouterr()[1]
        assert staging.is_dir() and not target.exists()
