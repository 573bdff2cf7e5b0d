"""train --resume of an interrupted run: it continues with the options it was started with. Another learning rate,
length, dtype, batch, seed, template or data is refused (exit 2, nothing written); where files are and how often
the run saves may change."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from helpers import QA_ROWS, train_config, write_jsonl

from lorasb_cli import adapter, train
from lorasb_cli.errors import BadInputError


def _config(inputs, out, **overrides):
    return train_config(inputs["model"], inputs["data"], out, factors=inputs["factors"], **{"max_steps": 6} | overrides)


def _snapshot(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted(tiny_model_dir, qa_file, factors_file, tmp_path_factory):
    """A run cut off in step 3: checkpoint-2 is complete, there is no final adapter and no metrics.json."""
    from transformers import TrainerCallback

    class CrashAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise _Crash

    inputs = {"model": tiny_model_dir, "data": qa_file, "factors": factors_file}
    out = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.raises(_Crash):
        train.train(_config(inputs, out), callbacks=[CrashAtStep3()])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / adapter.ADAPTER_FILE).exists() and not (out / "metrics.json").exists()
    return inputs, out


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"lr": 1e-2}, "--lr 0.05 → 0.01"),
        ({"max_steps": 8}, "--max-steps 6 → 8"),
        ({"dtype": "bfloat16"}, "--dtype auto → bfloat16"),
        ({"batch_size": 2}, "--batch-size 4 → 2"),
        ({"seed": 1}, "--seed 0 → 1"),
        # --force-template lets the factors' template (alpaca) go; the run's own still holds.
        ({"template": "plain", "force_template": True}, "--template auto → plain"),
    ],
    ids=["lr", "max-steps", "dtype", "batch-size", "seed", "template"],
)
def test_resume_with_another_option_is_refused_and_writes_nothing(interrupted, changed, named):
    inputs, out = interrupted
    before = _snapshot(out)
    with pytest.raises(BadInputError) as excinfo:
        train.train(_config(inputs, out, resume=True, **changed))
    assert excinfo.value.exit_status == 2
    assert "--resume continues the run with its own options" in excinfo.value.one_line()
    assert named in excinfo.value.one_line()
    assert _snapshot(out) == before


def test_resume_with_other_training_rows_is_refused(interrupted, tmp_path):
    inputs, out = interrupted
    before = _snapshot(out)
    other = write_jsonl(tmp_path / "qa.jsonl", QA_ROWS[::-1])  # the same rows in another order: another sample order
    with pytest.raises(BadInputError, match="the training data differs from the run's") as excinfo:
        train.train(_config(inputs | {"data": other}, out, resume=True))
    assert excinfo.value.exit_status == 2
    assert _snapshot(out) == before


def test_resume_with_another_save_steps_and_the_data_moved_finishes_the_run(interrupted, tmp_path):
    inputs, out = interrupted
    run = shutil.copytree(out, tmp_path / "run")
    moved = shutil.copy(inputs["data"], tmp_path / "moved.jsonl")  # the same rows in another place
    summary = train.train(_config(inputs | {"data": moved}, run, resume=True, save_steps=5))
    assert summary.steps == 6
    metrics = json.loads((run / "metrics.json").read_text())
    assert [s["step"] for s in metrics["loss"]] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-5", "checkpoint-6"]
    recorded = adapter.load_adapter(run).fields["train"]
    assert recorded["lr"] == 5e-2 and recorded["max_steps"] == 6
