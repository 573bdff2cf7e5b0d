"""One writer per run folder (`.lorasb.lock`), the takeover of a lock whose process is gone, and Ctrl-C: the first
asks for a checkpoint at the end of the step, a second stops at once (exit 130)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from transformers import TrainerCallback, TrainerControl

from lorasb_cli import cli, files, train
from lorasb_cli.errors import BadInputError
from lorasb_cli.trainer import COMPLETE_FILE, StopOnSignal

HOST = socket.gethostname()


def _dead_pid() -> int:
    """The id of a process of this host that has exited (and been reaped)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    lock = tmp_path / files.LOCK_FILE
    with files.folder_lock(tmp_path, "lorasb train"):
        assert lock.read_text() == f"{HOST} {os.getpid()}\n"
        with pytest.raises(BadInputError) as excinfo, files.folder_lock(tmp_path, "lorasb merge"):
            pass
        assert excinfo.value.exit_status == 2
        assert f"another lorasb merge is writing into this folder ({HOST} {os.getpid()})" in str(excinfo.value)
        assert lock.read_text() == f"{HOST} {os.getpid()}\n"  # the refused writer leaves the holder's lock
    assert not lock.exists()
    with pytest.raises(RuntimeError), files.folder_lock(tmp_path, "lorasb train"):
        raise RuntimeError  # a failing writer lets go too
    assert not lock.exists()


@pytest.mark.parametrize(
    "holder",
    [f"{HOST} {os.getpid()}", f"another-host.example {os.getpid()}", "another-host.example 1", "garbage"],
    ids=["running-here", "pid-of-another-host", "another-host", "unreadable"],
)
def test_a_lock_of_a_running_or_unknown_process_is_never_taken_over(tmp_path, holder):
    """A live process of this host holds its lock; of another host's, or an unreadable one, nothing is known."""
    (tmp_path / files.LOCK_FILE).write_text(holder + "\n")
    (tmp_path / ".adapter.safetensors.tmp").write_bytes(b"maybe still being written")
    refused = re.escape(f"another lorasb train is writing into this folder ({holder})")
    with pytest.raises(BadInputError, match=refused), files.folder_lock(tmp_path, "lorasb train"):
        pass
    assert (tmp_path / files.LOCK_FILE).read_text() == holder + "\n"
    assert (tmp_path / ".adapter.safetensors.tmp").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_and_its_temp_files_removed(tmp_path):
    lock = tmp_path / files.LOCK_FILE
    lock.write_text(f"{HOST} {_dead_pid()}\n")
    (tmp_path / "checkpoint-2").mkdir()
    stale = [tmp_path / ".metrics.json.tmp", tmp_path / "checkpoint-2" / ".trained.safetensors.tmp"]
    for path in stale:
        path.write_bytes(b"cut off")
    (tmp_path / "checkpoint-2" / "trained.safetensors").write_bytes(b"kept")
    with files.folder_lock(tmp_path, "lorasb train"):
        assert lock.read_text() == f"{HOST} {os.getpid()}\n"
        assert not any(path.exists() for path in stale)
        assert (tmp_path / "checkpoint-2" / "trained.safetensors").read_bytes() == b"kept"
    assert not lock.exists()


def test_overwrite_never_empties_a_folder_another_run_writes_into(tiny_model_dir, qa_file, factors_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / files.LOCK_FILE).write_text(f"{HOST} {os.getpid()}\n")
    (out / "checkpoint-2").mkdir()
    config = train.TrainConfig.from_options(
        model=str(tiny_model_dir), factors=str(factors_file), data=str(qa_file), out=str(out), overwrite=True
    )
    with pytest.raises(BadInputError, match="another lorasb train is writing into this folder"):
        train.train(config)
    assert sorted(p.name for p in out.iterdir()) == [files.LOCK_FILE, "checkpoint-2"]


def test_a_folder_holding_only_a_lock_is_not_content(tiny_model_dir, qa_file, factors_file, tmp_path):
    """Under a launcher rank 0 locks the run folder before another rank checks that it is empty: the lock alone
    must not fail that rank. Whether the holder still runs is the lock's question."""
    out = tmp_path / "run"
    out.mkdir()
    (out / files.LOCK_FILE).write_text(f"{HOST} {os.getpid()}\n")
    assert files.check_output_dir(out, {}, allow_nonempty=False, hint="") == out
    config = train.TrainConfig.from_options(
        model=str(tiny_model_dir), factors=str(factors_file), data=str(qa_file), out=str(out)
    )
    with pytest.raises(BadInputError, match="another lorasb train is writing into this folder"):
        train.train(config)
    (out / "metrics.json").write_text("{}")
    with pytest.raises(BadInputError, match="output directory exists and is not empty"):
        files.check_output_dir(out, {}, allow_nonempty=False, hint="")


def test_stop_on_signal_first_sigint_checkpoints_a_second_interrupts():
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop, control = StopOnSignal(), TrainerControl()
    stop.on_train_begin(None, None, control)
    try:
        signal.raise_signal(signal.SIGINT)
        assert stop.signal == signal.SIGINT
        stop.on_step_end(None, None, control)
        assert control.should_save and control.should_training_stop
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.on_train_end(None, None, control)
    assert {s: signal.getsignal(s) for s in handlers} == handlers


class _CtrlCTwice(TrainerCallback):
    """Presses Ctrl-C twice during step 3, as an impatient user does."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)


def test_a_second_ctrl_c_stops_train_at_once_with_exit_130(
    tiny_model_dir, qa_file, factors_file, tmp_path, capsys, monkeypatch
):
    """Through the real entry point: exit 130 and one error line; the run keeps its complete checkpoint-2, writes
    no checkpoint-3 and no final adapter, and lets go of its lock."""
    run_train = train.train
    monkeypatch.setattr(
        train, "train", lambda config, progress=None, **kwargs: run_train(config, progress, [_CtrlCTwice()], **kwargs)
    )
    out = tmp_path / "run"
    args = ["train", "-m", tiny_model_dir, "-f", factors_file, "-d", qa_file, "--max-steps", "6", "--batch-size", "4"]
    with pytest.raises(SystemExit) as excinfo:
        cli.main([*map(str, args), "--save-steps", "2", "-q", "-o", str(out)])
    stdout, stderr = capsys.readouterr()
    assert excinfo.value.code == 130 and stdout == ""
    assert stderr.strip().splitlines()[-1] == "Error: interrupted (SIGINT)"
    assert (out / "checkpoint-2" / COMPLETE_FILE).is_file() and not (out / "checkpoint-3").exists()
    assert not (out / "adapter.safetensors").exists() and not (out / "metrics.json").exists()
    assert not (out / files.LOCK_FILE).exists()
