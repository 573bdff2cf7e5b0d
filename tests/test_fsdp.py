"""--strategy fsdp (docs/design.md §5): the base sharded with FSDP2 over 2 CPU processes (gloo), every result checked against
one process: estimate's signs, training at the doubled batch, a resumed run (under fsdp and under ddp), a classifier's
head."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLASS_ROWS, QA_ROWS, classifier_factors, make_bert_dir, write_jsonl
from safetensors.torch import load_file

from lorasb_cli import adapter, artifacts, cli, estimate, train
from lorasb_cli.estimate import accumulator_owners
from lorasb_cli.trainer import TRAINED_FILE


def _launch(args: list, tmp_path: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m lorasb_cli ARGS`, one thread per process; fails the test on a failed job."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launch, "-m", "lorasb_cli", *map(str, args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("\n") == 1, done.stdout  # rank 0 alone prints
    return done


def test_accumulators_go_largest_first_to_the_least_loaded_rank():
    shapes = {"a": (2, 2), "b": (10, 1), "c": (7, 1), "d": (5, 1), "e": (3, 1)}
    # By size 10, 7, 5, 4, 3: 10 → 0; 7 → 1; 5 → 1 (7 < 10); 4 (a) → 0 (10 < 12); 3 → 1 (12 < 14).
    assert accumulator_owners(shapes, 2) == {"b": 0, "c": 1, "d": 1, "a": 0, "e": 1}
    assert accumulator_owners(shapes, 1) == dict.fromkeys(shapes, 0)
    assert set(accumulator_owners(shapes, 8).values()) == {0, 1, 2, 3, 4}  # one module each; 3 ranks hold none


def test_report_ranks_under_fsdp_is_refused(tiny_model_dir, qa_file, tmp_path, capsys):
    args = ["estimate", "-m", tiny_model_dir, "-d", qa_file, "--report-ranks", "2", "--strategy", "fsdp", "-q"]
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in [*args, "-o", tmp_path / "u.safetensors"]])
    out, err = capsys.readouterr()
    assert (excinfo.value.code, out) == (2, "") and err.count("\n") == 1, err
    assert err.startswith("Error: --report-ranks compares whole sums of two halves; --strategy fsdp"), err
    assert not (tmp_path / "u.safetensors").exists()


@pytest.mark.slow
def test_fsdp_estimate_equals_one_process(tiny_model_dir, qa_file, tmp_path):
    """9 samples in batches of 2: rank 0 runs 3 batches, rank 1 two and a repeat that adds nothing."""
    args = ["estimate", "-m", tiny_model_dir, "-d", qa_file, "--samples", 9, "--batch-size", 2, "--dtype", "float64"]
    _launch([*args, "--strategy", "fsdp", "-q", "-o", tmp_path / "two.safetensors"], tmp_path)
    config = estimate.EstimateConfig(
        model=str(tiny_model_dir), data=str(qa_file), samples=9, batch_size=2, dtype="float64", out=str(tmp_path / "1")
    )
    estimate.estimate(config)
    two, one = artifacts.Artifact(tmp_path / "two.safetensors"), artifacts.Artifact(tmp_path / "1")
    assert two.meta.samples == one.meta.samples == 9 and two.meta.tokens == one.meta.tokens
    assert two.names == one.names and len(one.names) == 14
    for name in one.names:
        assert torch.equal(two.get(name), one.get(name)), name


def _max_r_difference(run: Path, reference: Path) -> tuple[float, float]:
    """(max |R − R_ref| over modules, max |R_ref|)."""
    got, want = adapter.load_adapter(run), adapter.load_adapter(reference)
    assert got.factors.keys() == want.factors.keys()
    worst = max(float((got.factors[m][1] - r[1]).abs().max()) for m, r in want.factors.items())
    return worst, max(float(r[1].abs().max()) for r in want.factors.values())


TRAIN = ["--max-steps", 4, "--save-steps", 2, "--lr", 1e-2, "--scheduler", "constant", "--dtype", "float64", "-q"]
TRAIN += ["--logging-steps", 1]  # a loss per step, compared below


@pytest.fixture(scope="module")
def fsdp_run(tiny_model_dir, factors_file, tmp_path_factory):
    """4 steps of 2 × batch 4 under fsdp on 8 rows (a checkpoint every 2 steps), and one process at batch 8."""
    folder = tmp_path_factory.mktemp("fsdp-train")
    rows = write_jsonl(folder / "qa8.jsonl", QA_ROWS[:8])
    args = ["train", "-m", tiny_model_dir, "-f", factors_file, "-d", rows, *TRAIN]
    _launch([*args, "--batch-size", 4, "--strategy", "fsdp", "-o", folder / "two"], folder)
    one = train.TrainConfig.from_options(
        model=str(tiny_model_dir),
        factors=str(factors_file),
        data=str(rows),
        out=str(folder / "one"),
        batch_size=8,
        max_steps=4,
        save_steps=2,
        lr=1e-2,
        scheduler="constant",
        dtype="float64",
        logging_steps=1,
    )
    train.train(one)
    return folder, args


@pytest.mark.slow
def test_fsdp_training_equals_one_process_at_the_doubled_batch(fsdp_run):
    folder, _ = fsdp_run
    worst, largest = _max_r_difference(folder / "two", folder / "one")
    assert worst <= 1e-3 * largest, (worst, largest)
    losses = [
        [s["loss"] for s in json.loads((folder / r / "metrics.json").read_text())["loss"]] for r in ("two", "one")
    ]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-6)
    # Rank 0's checkpoint holds whole tensors: the trained Rs (r×r), equal to the final adapter's.
    trained = load_file(folder / "two" / "checkpoint-4" / TRAINED_FILE)
    final = adapter.load_adapter(folder / "two").factors
    assert trained.keys() == {f"{module}.lora_R" for module in final}
    for module, (_, lora_R, _) in final.items():
        assert torch.equal(trained[f"{module}.lora_R"].float(), lora_R), module


@pytest.mark.slow
def test_accelerate_launch_with_fsdp2_runs_the_fsdp_strategy(fsdp_run, tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2` reaches the same code as --strategy fsdp under torchrun: the
    same R to the last bit, one stdout line."""
    folder, args = fsdp_run
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--use_fsdp", "--fsdp_version", "2"]
    accelerate += ["--num_processes", "2", "--main_process_port", str(port), "-m", "lorasb_cli"]
    done = subprocess.run(
        [*accelerate, *map(str, [*args, "--batch-size", 4, "-o", tmp_path / "run"])],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.count("\n") == 1, done.stderr[-3000:]
    worst, _ = _max_r_difference(tmp_path / "run", folder / "two")
    assert worst == 0.0


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
@pytest.mark.slow
def test_fsdp_run_resumed_after_a_kill_ends_at_the_uninterrupted_r(fsdp_run, strategy, tmp_path):
    """The run as a kill in step 3 leaves it (checkpoint-2 alone), resumed under fsdp or ddp."""
    folder, args = fsdp_run
    killed = tmp_path / "run"
    shutil.copytree(folder / "two" / "checkpoint-2", killed / "checkpoint-2")
    _launch([*args, "--batch-size", 4, "--strategy", strategy, "--resume", "-o", killed], tmp_path)
    worst, largest = _max_r_difference(killed, folder / "two")
    assert worst <= 1e-9 * largest, (worst, largest)
    assert json.loads((killed / "metrics.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_a_classifier_head_trains_under_fsdp(tmp_path):
    """A BERT sequence classifier (no dropout, so that the processes' masks cannot differ): LoRA-SB's R and the
    head, 2 × batch 4 under fsdp against one process at batch 8."""
    model_dir = make_bert_dir(tmp_path / "bert")
    config = json.loads((model_dir / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    rows = write_jsonl(tmp_path / "c.jsonl", CLASS_ROWS[:16])
    factors = classifier_factors(tmp_path, model_dir, rows)
    args = ["train", "-m", model_dir, "-f", factors, "-d", rows, "--format", "classification", *TRAIN]
    _launch([*args, "--batch-size", 4, "--strategy", "fsdp", "-o", tmp_path / "two"], tmp_path)
    train.train(
        train.TrainConfig.from_options(
            model=str(model_dir),
            factors=str(factors),
            data=str(rows),
            format="classification",
            out=str(tmp_path / "one"),
            batch_size=8,
            max_steps=4,
            save_steps=2,
            lr=1e-2,
            scheduler="constant",
            dtype="float64",
            logging_steps=1,
        )
    )
    # The classifier's loss is a batch mean, not a token sum: the ranks' losses average to one process's.
    losses = [
        [s["loss"] for s in json.loads((tmp_path / r / "metrics.json").read_text())["loss"]] for r in ("two", "one")
    ]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-6)
    two, one = adapter.load_adapter(tmp_path / "two"), adapter.load_adapter(tmp_path / "one")
    start = artifacts.load_factors(factors)
    assert set(one.extra) == set(two.extra) == {"classifier.weight", "classifier.bias"}
    for name, want in one.extra.items():
        moved = float((want - start.extra[name]).abs().max())
        assert moved > 1e-2  # 4 AdamW steps of 1e-2: the head trained
        assert float((two.extra[name] - want).abs().max()) <= 1e-4 * moved, name
