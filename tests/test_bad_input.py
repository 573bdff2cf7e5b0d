"""The bad-input matrix (issue 15): every stage, every foreseeable mistake, through the real entry point.

Each case runs `lorasb ARGS` in-process and asserts what a user must get: exit status 2, one stderr line starting
`Error:` that names the problem, nothing on stdout, no output left behind, and every input unchanged (the files
of the model, data, update, factors and adapter are hashed before and after).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import CLASS_ROWS, QA_ROWS, write_jsonl

from lorasb_cli import cli


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """A model, data, update, factors and a trained adapter of their own, so that a case that changed an input
    would be seen (and could not spoil another test's fixtures)."""
    from lorasb_cli import estimate, train
    from lorasb_cli.decompose import DecomposeConfig, decompose

    root = tmp_path_factory.mktemp("world")
    model = Path(shutil.copytree(tiny_model_dir, root / "model"))
    qa = write_jsonl(root / "qa.jsonl", QA_ROWS)
    write_jsonl(root / "classes.jsonl", CLASS_ROWS)
    (root / "empty.jsonl").write_text("")
    (root / "notjson.jsonl").write_text("this is not json\n")
    write_jsonl(root / "nulls.jsonl", [{"question": None, "answer": "1"}] * 4)
    write_jsonl(root / "blank.jsonl", [{"question": "", "answer": " "}] * 4)
    write_jsonl(root / "noanswer.jsonl", [{"question": "What is 1 plus 1?"}] * 4)
    (root / "plain.txt").write_text("not a data file")
    (root / "file").write_text("a regular file")
    truncated = Path(shutil.copytree(model, root / "truncated"))
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    torch.save({"x": torch.zeros(1)}, root / "pickle.bin")
    update = root / "update.safetensors"
    estimate.estimate(estimate.EstimateConfig(model=str(model), data=str(qa), out=str(update), samples=8))
    factors = root / "factors.safetensors"
    decompose(DecomposeConfig.from_options(update=str(update), rank=4, out=str(factors)))
    raw = root / "raw.safetensors"
    estimate.estimate(estimate.EstimateConfig(model=str(model), data=str(qa), out=str(raw), samples=8, raw=True))
    run = root / "run"
    train.train(
        train.TrainConfig.from_options(
            model=str(model), data=str(qa), out=str(run), factors=str(factors), max_steps=2, batch_size=4, save_steps=50
        )
    )
    os.link(qa, root / "qa-link.jsonl")  # a hard link: the same file under another name
    return root


def _fill(args: list[str], root: Path, out: Path) -> list[str]:
    names = {
        "{model}": root / "model",
        "{data}": root / "qa.jsonl",
        "{update}": root / "update.safetensors",
        "{factors}": root / "factors.safetensors",
        "{raw}": root / "raw.safetensors",
        "{adapter}": root / "run",
        "{out}": out,
        "{root}": root,
    }
    filled = []
    for arg in args:
        for key, value in names.items():
            arg = arg.replace(key, str(value))
        filled.append(arg)
    return filled


E = ["estimate", "-m", "{model}", "-d", "{data}", "-q"]
D = ["decompose", "{update}", "-q"]
T = ["train", "-m", "{model}", "-d", "{data}", "-f", "{factors}", "-q", "--max-steps", "1"]
TL = ["train", "-m", "{model}", "-d", "{data}", "--method", "lora", "--rank", "2", "-q", "--max-steps", "1"]
M = ["merge", "-a", "{adapter}", "-m", "{model}", "-q"]
V = ["evaluate", "-m", "{model}", "-t", "gsm8k", "-d", "{data}", "-q"]

# (id, args, what the one error line must contain). "-o {out}" is added unless the case names its own -o.
CASES = [
    # --- inputs are never outputs
    ("estimate-o-model-weights", [*E, "-o", "{model}/model.safetensors"], "would overwrite or write into the model"),
    ("estimate-o-model-config", [*E, "-o", "{model}/config.json"], "would overwrite or write into the model"),
    ("estimate-o-data", [*E, "-o", "{data}"], "would overwrite or write into the data"),
    ("estimate-o-data-hardlink", [*E, "-o", "{root}/qa-link.jsonl"], "would overwrite or write into the data"),
    ("estimate-o-folder", [*E, "-o", "{root}"], "output path is a directory"),
    ("estimate-fsdp-quantized", [*E, "--strategy", "fsdp", "--quantize", "nf4"], "fsdp with --quantize nf4"),
    ("train-fsdp-quantized", [*T, "--strategy", "fsdp", "--quantize", "nf4", "-o", "{root}/r"], "fsdp with --quantize"),
    ("estimate-o-under-file", [*E, "-o", "{root}/file/u.safetensors"], "under a regular file"),
    ("decompose-o-update", [*D, "-r", "2", "-o", "{update}"], "would overwrite or write into the update"),
    ("combine-o-shard", ["combine", "{raw}", "-q", "-o", "{raw}"], "would overwrite or write into the shard"),
    ("train-o-model", [*T, "-o", "{model}"], "would overwrite or write into the model"),
    ("train-o-holding-data", [*T, "-o", "{root}"], "would overwrite or write into the"),
    ("train-o-file", [*T, "-o", "{data}"], "output path is a file"),
    ("merge-o-adapter", [*M, "-o", "{adapter}", "--overwrite"], "would overwrite or write into the adapter"),
    ("merge-o-model", [*M, "-o", "{model}", "--overwrite"], "would overwrite or write into the"),
    ("merge-o-file", [*M, "-o", "{data}"], "output path is a file"),
    ("evaluate-o-data", [*V, "-o", "{data}"], "would overwrite or write into the data"),
    ("evaluate-o-adapter-file", [*V, "-a", "{adapter}", "-o", "{adapter}/adapter.safetensors"], "into the adapter"),
    ("evaluate-o-folder", [*V, "-o", "{root}"], "output path is a directory"),
    ("data-o-folder", ["data", "arithmetic", "--size", "3", "-q", "-o", "{root}"], "output path is a directory"),
    # --- missing or wrong files
    ("estimate-no-model", ["estimate", "-m", "{root}/nope", "-d", "{data}", "-q"], "nope"),
    ("estimate-not-a-model-dir", ["estimate", "-m", "{root}", "-d", "{data}", "-q"], "config.json is missing"),
    ("estimate-truncated-weights", ["estimate", "-m", "{root}/truncated", "-d", "{data}", "-q"], "unreadable"),
    (
        "evaluate-truncated-weights",
        ["evaluate", "-m", "{root}/truncated", "-t", "gsm8k", "-d", "{data}", "-q"],
        "unreadable",
    ),
    ("estimate-no-data", ["estimate", "-m", "{model}", "-d", "{root}/none.jsonl", "-q"], "none.jsonl"),
    ("estimate-empty-data", ["estimate", "-m", "{model}", "-d", "{root}/empty.jsonl", "-q"], "empty"),
    ("estimate-not-json", ["estimate", "-m", "{model}", "-d", "{root}/notjson.jsonl", "-q"], "not JSON"),
    ("estimate-txt-data", ["estimate", "-m", "{model}", "-d", "{root}/plain.txt", "-q"], "plain.txt"),
    ("decompose-no-update", ["decompose", "{root}/none.safetensors", "-r", "2", "-q"], "none.safetensors"),
    ("decompose-pickle", ["decompose", "{root}/pickle.bin", "-r", "2", "-q"], "safetensors"),
    ("decompose-factors-as-update", ["decompose", "{factors}", "-r", "2", "-q"], "lorasb estimate"),
    ("decompose-raw-as-update", ["decompose", "{raw}", "-r", "2", "-q"], "combine"),
    ("combine-update-as-shard", ["combine", "{update}", "-q"], "estimate --raw"),
    ("combine-none", ["combine", "-q"], "PARTS"),
    ("train-update-as-factors", [*T[:5], "-f", "{update}", "-q"], "lorasb decompose"),
    ("train-no-factors-file", [*T[:5], "-f", "{root}/none.safetensors", "-q"], "none.safetensors"),
    ("merge-no-adapter", ["merge", "-a", "{root}/none", "-m", "{model}", "-q"], "none"),
    ("merge-folder-without-adapter", ["merge", "-a", "{root}", "-m", "{model}", "-q"], "adapter"),
    ("merge-update-as-adapter", ["merge", "-a", "{update}", "-m", "{model}", "-q"], "lorasb train"),
    ("evaluate-no-adapter", [*V, "-a", "{root}/none"], "none"),
    ("inspect-none", ["inspect", "{root}/none.safetensors", "-q"], "none.safetensors"),
    ("inspect-pickle", ["inspect", "{root}/pickle.bin", "-q"], "safetensors"),
    ("inspect-text", ["inspect", "{root}/plain.txt", "-q"], "plain.txt"),
    # --- data that does not fit the run
    ("estimate-nulls", ["estimate", "-m", "{model}", "-d", "{root}/nulls.jsonl", "-q"], "question"),
    ("estimate-blank-text", ["estimate", "-m", "{model}", "-d", "{root}/blank.jsonl", "-q"], "empty"),
    ("train-blank-text", [*T[:3], "-d", "{root}/blank.jsonl", *T[5:]], "empty"),
    ("estimate-fields-unknown-column", [*E, "--fields", "prompt=nope,response=answer"], "nope"),
    ("estimate-fields-bad-role", [*E, "--fields", "colour=question"], "colour"),
    ("estimate-fields-syntax", [*E, "--fields", "prompt"], "--fields"),
    ("estimate-format-unknown", [*E, "--format", "poetry"], "poetry"),
    ("estimate-format-classification-qa", [*E, "--format", "classification"], "classification"),
    ("estimate-template-unknown", [*E, "--template", "jinja"], "jinja"),
    ("estimate-split-unknown", ["estimate", "-m", "{model}", "-d", "arithmetic", "--split", "dev", "-q"], "dev"),
    ("estimate-builtin-typo", ["estimate", "-m", "{model}", "-d", "arithmetc", "-q"], "arithmetc"),
    ("estimate-size-on-file", [*E, "--size", "3"], "--size"),
    ("train-eval-task-without-data", [*T, "--eval-task", "gsm8k"], "--eval-data"),
    (
        "evaluate-missing-field",
        ["evaluate", "-m", "{model}", "-t", "gsm8k", "-d", "{root}/noanswer.jsonl", "-q"],
        "answer",
    ),
    ("evaluate-task-unknown", ["evaluate", "-m", "{model}", "-t", "gsm9k", "-d", "{data}", "-q"], "gsm9k"),
    (
        "evaluate-classify-on-causal-lm",
        ["evaluate", "-m", "{model}", "-t", "classification", "-d", "{root}/classes.jsonl", "-q"],
        "sequence-classification",
    ),
    ("data-unknown", ["data", "arithmetc", "-q"], "arithmetc"),
    ("data-split-unknown", ["data", "arithmetic", "--split", "dev", "-q"], "dev"),
    ("data-size-zero", ["data", "arithmetic", "--size", "0", "-q"], "--size"),
    ("data-seed-negative", ["data", "arithmetic", "--seed", "-1", "-q"], "seed"),
    # --- numbers out of range
    ("estimate-eta-zero", [*E, "--eta", "0"], "--eta"),
    ("estimate-eta-negative", [*E, "--eta", "-1e-5"], "--eta"),
    ("estimate-eta-inf", [*E, "--eta", "inf"], "--eta"),
    ("estimate-eta-nan", [*E, "--eta", "nan"], "--eta"),
    ("estimate-frac-zero", [*E, "--frac", "0"], "--frac"),
    ("estimate-frac-above-one", [*E, "--frac", "1.5"], "--frac"),
    ("estimate-frac-and-samples", [*E, "--frac", "0.5", "--samples", "3"], "--frac"),
    ("estimate-samples-zero", [*E, "--samples", "0"], "--samples"),
    ("estimate-samples-too-many", [*E, "--samples", "1000"], "--samples"),
    ("estimate-batch-zero", [*E, "--batch-size", "0"], "--batch-size"),
    ("estimate-max-length-zero", [*E, "--max-length", "0"], "--max-length"),
    ("estimate-shard-syntax", [*E, "--shard", "1of2", "--raw"], "--shard"),
    ("estimate-shard-range", [*E, "--shard", "2/2", "--raw"], "--shard"),
    ("estimate-shard-without-raw", [*E, "--shard", "0/2"], "--raw"),
    ("estimate-targets-unknown", [*E, "--targets", "nothing_proj"], "nothing_proj"),
    ("estimate-accumulate-on", [*E, "--accumulate-on", "disk"], "disk"),
    ("estimate-accumulate-dtype", [*E, "--accumulate-dtype", "int8"], "int8"),
    ("estimate-dtype-unknown", [*E, "--dtype", "float8"], "float8"),
    ("estimate-device-cuda", [*E, "--device", "cuda"], "cuda"),
    ("estimate-device-unknown", [*E, "--device", "tpu9"], "tpu9"),
    ("decompose-rank-zero", [*D, "-r", "0"], "--rank"),
    ("decompose-rank-negative", [*D, "-r", "-3"], "--rank"),
    ("decompose-rank-too-big", [*D, "-r", "10000"], "--rank"),
    ("decompose-init-unknown", [*D, "-r", "2", "--init", "lorra"], "lorra"),
    ("decompose-niter-negative", [*D, "-r", "2", "--niter", "-1"], "--niter"),
    ("decompose-noisy-without-std", [*D, "-r", "2", "--init", "noisy"], "--noise-std"),
    ("decompose-model-for-update-init", [*D, "-r", "2", "-m", "{model}"], "--model"),
    ("decompose-xs-without-model", ["decompose", "--init", "lora-xs", "-r", "2", "-q"], "--model"),
    ("decompose-nothing", ["decompose", "-r", "2", "-q"], "update"),
    ("train-lr-zero", [*T, "--lr", "0"], "--lr"),
    ("train-lr-negative", [*T, "--lr", "-1"], "--lr"),
    ("train-batch-zero", [*T, "--batch-size", "0"], "--batch-size"),
    ("train-grad-accum-zero", [*T, "--grad-accum", "0"], "--grad-accum"),
    ("train-warmup-one", [*T, "--warmup-ratio", "1"], "--warmup-ratio"),
    ("train-max-steps-zero", [*T[:-2], "--max-steps", "0"], "--max-steps"),
    ("train-epochs-zero", [*T, "--epochs", "0"], "--epochs"),
    ("train-save-steps-zero", [*T, "--save-steps", "0"], "--save-steps"),
    ("train-init-scale-inf", [*T, "--init-scale", "inf"], "--init-scale"),
    ("train-init-scale-word", [*T, "--init-scale", "big"], "--init-scale"),
    ("train-scheduler-unknown", [*T, "--scheduler", "cosinus"], "cosinus"),
    ("train-method-unknown", [*T, "--method", "lorra"], "lorra"),
    ("train-lorasb-without-factors", [*T[:5], "-q"], "--factors"),
    ("train-lora-with-factors", [*TL, "-f", "{factors}"], "--factors"),
    ("train-lora-without-rank", [*TL[:7], "-q"], "--rank"),
    ("train-lora-rank-too-big", [*TL[:7], "--rank", "10000", "-q"], "--rank"),
    ("train-alpha-negative", [*TL, "--alpha", "-1"], "--alpha"),
    ("train-init-samples-zero", [*TL, "--init-samples", "0"], "--init-samples"),
    ("train-init-iters-zero", [*TL, "--init-iters", "0"], "--init-iters"),
    ("train-init-scale-for-lora", [*TL, "--init-scale", "2"], "--init-scale"),
    ("train-resume-nothing", [*T, "--resume"], "--resume"),
    ("train-template-differs", [*T, "--template", "plain"], "template"),
    ("merge-format-unknown", [*M, "--format", "gguf"], "gguf"),
    ("merge-dtype-unknown", [*M, "--dtype", "float8"], "float8"),
    ("merge-shard-size-bad", [*M, "--max-shard-size", "lots"], "lots"),
    ("evaluate-batch-zero", [*V, "--batch-size", "0"], "--batch-size"),
    ("evaluate-limit-zero", [*V, "--limit", "0"], "--limit"),
    ("evaluate-max-new-tokens-zero", [*V, "--max-new-tokens", "0"], "--max-new-tokens"),
    ("evaluate-scoring-unknown", [*V, "--scoring", "vibes"], "vibes"),
    ("evaluate-template-unknown", [*V, "--template", "jinja"], "jinja"),
    (
        "compare-methods-unknown",
        ["compare", "-m", "{model}", "-d", "{data}", "-t", "gsm8k", "--methods", "lorra", "-q"],
        "lorra",
    ),
    (
        "compare-ranks-syntax",
        ["compare", "-m", "{model}", "-d", "{data}", "-t", "gsm8k", "--methods", "lora", "--ranks", "a,b", "-q"],
        "--ranks",
    ),
    (
        "compare-seeds-zero",
        ["compare", "-m", "{model}", "-d", "{data}", "-t", "gsm8k", "--methods", "lora:2", "--seeds", "0", "-q"],
        "--seeds",
    ),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(("args", "problem"), [pytest.param(a, p, id=i) for i, a, p in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, tmp_path, capsys, args, problem):
    out = tmp_path / "out"
    argv = _fill(args if "-o" in args or args[0] in ("inspect",) else [*args, "-o", "{out}"], world, out)
    before = _snapshot(world)
    with pytest.raises(SystemExit) as excinfo:
        cli.main(argv)
    stdout, stderr = capsys.readouterr()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert excinfo.value.code == 2, stderr
    assert stdout == ""
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert problem in lines[0], lines[0]
    assert "Traceback" not in stderr and not re.match(r"Error: \w+(Error|Exception)\b", lines[0])  # no bare exception
    assert _snapshot(world) == before  # no input changed, and nothing was written among the inputs
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no output, not even a temp file


def test_the_matrix_covers_every_stage_with_at_least_100_cases():
    stages = {args[0] for _, args, _ in CASES}
    assert len(CASES) >= 100
    assert stages >= {"estimate", "combine", "decompose", "train", "merge", "evaluate", "inspect", "data", "compare"}


def test_pickle_weights_are_refused_unless_allowed_and_then_give_the_same_update(world, tmp_path, capsys):
    """Safetensors only (docs/design.md §2); --allow-pickle reads .bin through torch.load(weights_only=True)."""
    from safetensors.torch import load_file

    from lorasb_cli import artifacts

    pickled = Path(shutil.copytree(world / "model", tmp_path / "pickled"))
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    args = ["estimate", "-m", str(pickled), "-d", str(world / "qa.jsonl"), "--samples", "8", "-q"]
    with pytest.raises(SystemExit) as excinfo:
        cli.main([*args, "-o", str(tmp_path / "refused.safetensors")])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and "not safetensors (found pytorch_model.bin)" in err and "--allow-pickle" in err
    assert not (tmp_path / "refused.safetensors").exists()
    with pytest.raises(SystemExit) as excinfo:
        cli.main([*args, "--allow-pickle", "-o", str(tmp_path / "u.safetensors")])
    assert excinfo.value.code == 0, capsys.readouterr().err
    args[2] = str(world / "model")
    with pytest.raises(SystemExit) as excinfo:
        cli.main([*args, "-o", str(tmp_path / "reference.safetensors")])
    assert excinfo.value.code == 0
    same = artifacts.Artifact(tmp_path / "reference.safetensors")
    loaded = artifacts.Artifact(tmp_path / "u.safetensors")
    assert all(torch.equal(loaded.get(n), same.get(n)) for n in same.names)
