"""Training checkpoints are complete or invisible (docs/design.md §2): the marker lists every file with its size and
sha256, and `train --resume` takes the newest checkpoint that verifies, naming each one it skipped and why."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch
from helpers import train_config

from lorasb_cli import adapter, cli, train
from lorasb_cli.errors import BadInputError
from lorasb_cli.trainer import COMPLETE_FILE, REQUIRED_FILES, TRAINED_FILE, newest_verified_checkpoint


def _config(inputs, out, **overrides):
    return train_config(inputs["model"], inputs["data"], out, factors=inputs["factors"], **overrides)


def _r(run_dir) -> dict[str, torch.Tensor]:
    return {m: r for m, (_, r, _) in adapter.load_adapter(run_dir).factors.items()}


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, qa_file, factors_file):
    return {"model": tiny_model_dir, "data": qa_file, "factors": factors_file}


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train.train(_config(inputs, out))
    return out


@pytest.fixture(scope="module")
def uninterrupted(finished) -> dict[str, torch.Tensor]:
    return _r(finished)


@pytest.fixture(scope="module")
def interrupted(inputs, tmp_path_factory):
    """A run that crashed in step 5, after checkpoints 2 and 4 were complete."""
    from transformers import TrainerCallback

    class CrashAtStep5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise _Crash

    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(_Crash):
        train.train(_config(inputs, out), callbacks=[CrashAtStep5()])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return out


def test_the_marker_lists_every_file_of_the_checkpoint_with_its_size_and_sha256(interrupted):
    checkpoint = interrupted / "checkpoint-4"
    files = json.loads((checkpoint / COMPLETE_FILE).read_text())["files"]
    on_disk = {p.name for p in checkpoint.iterdir()} - {COMPLETE_FILE}
    assert set(files) == on_disk and on_disk >= {*REQUIRED_FILES, "rng_state.pth"}
    for name, recorded in files.items():
        content = (checkpoint / name).read_bytes()
        assert recorded == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}, name


def _delete(path):
    path.unlink()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_json(path):
    path.write_text(path.read_text()[:-20])


def _flip_a_byte(path):
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x01  # same size: only the hash can tell
    path.write_bytes(bytes(content))


@pytest.mark.parametrize(
    ("damaged", "damage", "why"),
    [
        ("optimizer.pt", _delete, "optimizer.pt missing"),
        (TRAINED_FILE, _truncate, f"{TRAINED_FILE} is "),
        (COMPLETE_FILE, _corrupt_json, "marker unreadable"),
        (adapter.ADAPTER_FILE, _flip_a_byte, f"{adapter.ADAPTER_FILE} sha256 differs"),
        ("scheduler.pt", _flip_a_byte, "scheduler.pt sha256 differs"),
    ],
    ids=["optimizer-deleted", "trained-truncated", "marker-corrupt", "adapter-byte-flipped", "scheduler-byte-flipped"],
)
def test_resume_skips_a_damaged_newest_checkpoint_and_reaches_the_uninterrupted_r(
    inputs, uninterrupted, interrupted, tmp_path, caplog, damaged, damage, why
):
    out = shutil.copytree(interrupted, tmp_path / "run")
    damage(out / "checkpoint-4" / damaged)
    stray = out / "checkpoint-4" / ".optimizer.pt.Xf3k9q"  # an interrupted rsync's partial file
    stray.write_bytes(b"partial")
    found = newest_verified_checkpoint(out)
    assert found.checkpoint == out / "checkpoint-2" and found.verified
    assert [name for name, _ in found.skipped] == ["checkpoint-4"] and why in found.skipped[0][1]
    with caplog.at_level(logging.WARNING, logger="lorasb"):
        summary = train.train(_config(inputs, out, resume=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "checkpoint-4" in w] == [f"--resume skips checkpoint-4: {found.skipped[0][1]}"]
    assert summary.steps == 8
    resumed = _r(out)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[m], uninterrupted[m]) for m in resumed)
    # The resumed run saved checkpoint-4 anew, whole, with nothing of the damaged one left.
    assert newest_verified_checkpoint(out).skipped == [] and not stray.exists()
    files = json.loads((out / "checkpoint-4" / COMPLETE_FILE).read_text())["files"]
    assert set(files) == {p.name for p in (out / "checkpoint-4").iterdir()} - {COMPLETE_FILE}


def test_with_every_checkpoint_damaged_resume_is_one_line_exit_2(inputs, interrupted, tmp_path, capsys):
    out = shutil.copytree(interrupted, tmp_path / "run")
    _delete(out / "checkpoint-4" / "optimizer.pt")
    _corrupt_json(out / "checkpoint-2" / COMPLETE_FILE)
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = ["train", "-m", inputs["model"], "-d", inputs["data"], "-f", inputs["factors"], "-o", out, "--resume"]
    args += ["--max-steps", 8, "--batch-size", 4, "--lr", 5e-2, "--save-steps", 2, "--seed", 0, "-q"]
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in args])
    stdout, stderr = capsys.readouterr()
    assert excinfo.value.code == 2 and stdout == ""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: --resume: no checkpoint of the run verifies: checkpoint-4: optimizer.pt missing")
    assert "(and 1 older one fails too)" in lines[0] and "--overwrite" in lines[0]
    assert {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_checkpoint_cut_off_before_its_marker_is_skipped(inputs, interrupted, tmp_path):
    out = shutil.copytree(interrupted, tmp_path / "run")
    (out / "checkpoint-4" / COMPLETE_FILE).unlink()
    found = newest_verified_checkpoint(out)
    assert found.checkpoint == out / "checkpoint-2"
    assert found.skipped == [("checkpoint-4", "no completion marker: cut off while it was saved")]
    shutil.rmtree(out / "checkpoint-2")
    with pytest.raises(BadInputError, match="checkpoint-4: no completion marker") as excinfo:
        train.train(_config(inputs, out, resume=True))
    assert excinfo.value.exit_status == 2


def test_a_marker_that_lists_no_files_resumes_only_with_everything_there_and_a_warning(
    inputs, uninterrupted, interrupted, tmp_path, caplog
):
    """A marker written before markers listed files: its checkpoint resumes (the run is not stranded by an upgrade)
    with a warning that it is unverified, and only if every file resuming needs is there."""
    out = shutil.copytree(interrupted, tmp_path / "run")
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        marker = out / checkpoint / COMPLETE_FILE
        record = json.loads(marker.read_text())
        del record["files"]
        marker.write_text(json.dumps(record))
    _delete(out / "checkpoint-4" / "scheduler.pt")
    found = newest_verified_checkpoint(out)
    assert found.checkpoint == out / "checkpoint-2" and not found.verified
    assert found.skipped == [("checkpoint-4", "scheduler.pt missing")]
    with caplog.at_level(logging.WARNING, logger="lorasb"):
        train.train(_config(inputs, out, resume=True))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "--resume skips checkpoint-4: scheduler.pt missing" in warnings
    assert any(w.startswith("--resume: checkpoint-2 was saved by an older lorasb") for w in warnings)
    resumed = _r(out)
    assert all(torch.equal(resumed[m], uninterrupted[m]) for m in resumed)


def test_a_finished_run_with_an_unreadable_adapter_config_is_refused_in_one_line(inputs, finished, tmp_path):
    out = shutil.copytree(finished, tmp_path / "run")
    _corrupt_json(out / adapter.CONFIG_FILE)
    with pytest.raises(BadInputError, match="--resume: the run's adapter_config.json is unreadable") as excinfo:
        train.train(_config(inputs, out, resume=True))
    assert excinfo.value.exit_status == 2
