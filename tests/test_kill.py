"""Kill tests (issue 15): SIGKILL each stage at chosen points in a subprocess, then look at what is left.

A kill point is a function of the stage's own code that, on its n-th call, kills the process (SIGKILL: no handler
runs, no `finally`). Afterwards no file or folder under the final output name may exist that a later stage would
take, no input may have changed, and `train --resume` must end at exactly the R of an uninterrupted run. SIGTERM
and SIGINT, which lorasb handles, must end a run with a checkpoint and exit 143 / 130.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import QA_ROWS, write_jsonl

from lorasb_cli import adapter, artifacts, files

pytestmark = pytest.mark.slow  # 12 subprocess runs of the stages: CI runs them (.ci/run), `make test` does not

# Runs `lorasb ARGS` with the function MODULE:NAME (NAME may be CLASS.METHOD) wrapped so that its CALL-th call sends
# the process SIGNAL (SIGKILL unless named), before (`when` = "before") or after it ran.
KILLER = """
import importlib, json, os, signal, sys
target, call, when, args, signum = json.loads(sys.argv[1])
module_name, _, attribute = target.partition(":")
owner = importlib.import_module(module_name)
parts = attribute.split(".")
for part in parts[:-1]:
    owner = getattr(owner, part)
original = getattr(owner, parts[-1])
calls = [0]
def wrapped(*a, **k):
    calls[0] += 1
    if calls[0] == call and when == "before":
        os.kill(os.getpid(), signum)
    result = original(*a, **k)
    if calls[0] == call and when == "after":
        os.kill(os.getpid(), signum)
    return result
setattr(owner, parts[-1], wrapped)
from lorasb_cli.cli import main
main(args)
"""


def _lorasb(args: list, *, kill: tuple[str, int, str] | None = None, signum: int = signal.SIGKILL):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if kill is None:
        argv = [sys.executable, "-m", "lorasb_cli", *map(str, args)]
    else:
        argv = [sys.executable, "-c", KILLER, json.dumps([*kill, [str(a) for a in args], int(signum)])]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)


def _snapshot(*roots: Path) -> dict[str, str]:
    files = [p for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    from lorasb_cli import estimate
    from lorasb_cli.decompose import DecomposeConfig, decompose

    root = tmp_path_factory.mktemp("kill-inputs")
    data = write_jsonl(root / "qa.jsonl", QA_ROWS)
    update = root / "u.safetensors"
    estimate.estimate(estimate.EstimateConfig(model=str(tiny_model_dir), data=str(data), out=str(update), samples=8))
    factors = root / "f.safetensors"
    decompose(DecomposeConfig.from_options(update=str(update), rank=4, out=str(factors)))
    return {"model": tiny_model_dir, "data": data, "update": update, "factors": factors}


def _train_args(inputs, out) -> list:
    return [
        "train",
        "-m",
        inputs["model"],
        "-d",
        inputs["data"],
        "-f",
        inputs["factors"],
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--lr",
        "5e-2",
        "--save-steps",
        "2",
        "--scheduler",
        "constant",
        "-q",
        "-o",
        out,
    ]


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-reference") / "run"
    done = _lorasb(_train_args(inputs, out))
    assert done.returncode == 0, done.stderr
    return {m: r for m, (_, r, _) in adapter.load_adapter(out).factors.items()}


@pytest.mark.parametrize(
    ("stage", "kill"),
    [
        ("estimate", ("lorasb_cli.loss:per_sample_loss_sum", 2, "before")),  # in the middle of the sum
        ("estimate", ("os:replace", 1, "before")),  # the update written under its temporary name
        ("decompose", ("lorasb_cli.linalg:truncated_svd", 3, "after")),  # three modules factored
        ("decompose", ("safetensors.torch:save_file", 1, "after")),  # written, not yet renamed
        ("merge", ("lorasb_cli.merge:merge_weight", 5, "after")),  # in the middle of the merged shard
        ("merge", ("os:replace", 1, "before")),  # the shard complete under its temporary name
    ],
    ids=[
        "estimate-mid-sum",
        "estimate-before-rename",
        "decompose-mid-svd",
        "decompose-before-rename",
        "merge-mid-shard",
        "merge-before-rename",
    ],
)
def test_a_killed_stage_leaves_no_output_and_no_changed_input(inputs, uninterrupted, tmp_path, stage, kill):
    outs = {"estimate": tmp_path / "u.safetensors", "decompose": tmp_path / "f.safetensors", "merge": tmp_path / "m"}
    out = outs[stage]
    args = {
        "estimate": ["estimate", "-m", inputs["model"], "-d", inputs["data"], "--samples", "8", "--batch-size", "2"],
        "decompose": ["decompose", inputs["update"], "--rank", "4"],
        "merge": ["merge", "-a", inputs["factors"], "-m", inputs["model"]],
    }[stage]
    before = _snapshot(*(Path(p) for p in inputs.values()))
    done = _lorasb([*args, "-q", "-o", out], kill=kill)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not out.exists()  # nothing under the final name: a later stage finds no half-written file
    assert _snapshot(*(Path(p) for p in inputs.values())) == before
    # The next run into the same place succeeds and removes what the killed one left.
    done = _lorasb([*args, "-q", "-o", out])
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    if stage != "merge":
        artifacts.Artifact(out).verify()


@pytest.mark.parametrize(
    "kill",
    [
        ("lorasb_cli.trainer:DivergenceGuard.on_step_end", 3, "after"),  # after step 3, between checkpoints
        ("lorasb_cli.trainer:AdapterTrainer._save_optimizer_and_scheduler", 2, "before"),  # inside checkpoint-4
        ("lorasb_cli.trainer:AdapterTrainer._save_rng_state", 2, "after"),  # checkpoint-4 without its mark
        ("lorasb_cli.adapter:save_adapter", 4, "after"),  # the final adapter written, metrics not yet
    ],
    ids=["between-checkpoints", "during-a-checkpoint", "before-the-mark", "before-metrics"],
)
def test_a_killed_train_resumes_to_the_uninterrupted_r(inputs, uninterrupted, tmp_path, kill):
    out = tmp_path / "run"
    before = _snapshot(*(Path(p) for p in inputs.values()))
    done = _lorasb(_train_args(inputs, out), kill=kill)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not (out / "metrics.json").exists()
    resumed = _lorasb([*_train_args(inputs, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == f"{out}\n"
    r = {m: r for m, (_, r, _) in adapter.load_adapter(out).factors.items()}
    assert r.keys() == uninterrupted.keys() and all(torch.equal(r[m], uninterrupted[m]) for m in r)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    assert not list(out.glob("**/.*.tmp")) and not (out / files.LOCK_FILE).exists()
    assert _snapshot(*(Path(p) for p in inputs.values())) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_train_saves_a_checkpoint_exits_128_plus_n_and_resumes(inputs, uninterrupted, tmp_path, signum):
    """The signal arrives during step 3 (sent by the process itself, so the step is known): the run ends with
    checkpoint-3, one error line naming the signal and how to resume, and exit 128 + n."""
    out = tmp_path / "run"
    done = _lorasb(
        _train_args(inputs, out), kill=("lorasb_cli.trainer:DivergenceGuard.on_step_end", 3, "before"), signum=signum
    )
    assert done.returncode == 128 + signum, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.stdout == "" and lines[-1].startswith("Error: ") and "--resume" in lines[-1], done.stderr
    assert signal.Signals(signum).name in lines[-1] and "checkpoint-3" in lines[-1]
    assert (out / "checkpoint-3" / "lorasb-complete.json").is_file() and not (out / "metrics.json").exists()
    resumed = _lorasb([*_train_args(inputs, out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    r = {m: r for m, (_, r, _) in adapter.load_adapter(out).factors.items()}
    assert all(torch.equal(r[m], uninterrupted[m]) for m in r)
    metrics = (out / "metrics.json").read_bytes()
    again = _lorasb([*_train_args(inputs, out), "--resume"])  # a finished run resumed is left as it is
    assert again.returncode == 0 and again.stdout == f"{out}\n" and (out / "metrics.json").read_bytes() == metrics
