"""train's tracking and logs: --report-to (TensorBoard read back offline), the plain step lines on a non-terminal
stderr, --logging-steps, --weight-decay against AdamW's decoupled decay, and --lora-dropout in PEFT's layers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types

import pytest
import torch
from helpers import make_llama, train_config

from lorasb_cli import adapter, cli, methods, models, tracking, train
from lorasb_cli.errors import BadInputError
from lorasb_cli.trainer import newest_verified_checkpoint

STEP_LINE = re.compile(
    r"step (\d+)/(\d+)  loss (\d+\.\d{4})  lr (\S+)  grad-norm (\d+\.\d{3})  tok/s (\d+)  "
    r"elapsed (\d+:\d\d:\d\d)  eta (\d+:\d\d:\d\d)"
)


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_and_stderr_lines_log_every_logging_step(tiny_model_dir, qa_file, tmp_path):
    run = tmp_path / "run"
    args = ["-m", tiny_model_dir, "-d", qa_file, "--method", "lora", "-r", "4", "--lora-dropout", "0.1"]
    args += ["--batch-size", "4", "--max-steps", "6", "--logging-steps", "2", "--lr", "1e-2", "--weight-decay", "0.01"]
    args += ["--report-to", "tensorboard", "-o", run]
    with (tmp_path / "stderr.txt").open("w") as stderr:  # a file: not a terminal
        done = subprocess.run(
            [sys.executable, "-m", "lorasb_cli", "train", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            timeout=600,
            check=False,
        )
    err = (tmp_path / "stderr.txt").read_text()
    assert done.returncode == 0, err[-3000:]
    recorded = json.loads((run / "metrics.json").read_text())["loss"]
    assert [point["step"] for point in recorded] == [2, 4, 6]

    # One plain line per logging step, its loss and lr those the run recorded.
    lines = [STEP_LINE.fullmatch(line) for line in err.splitlines() if line.startswith("step ")]
    assert all(lines) and len(lines) == 6 // 2, err
    assert [(int(m[1]), int(m[2])) for m in lines] == [(2, 6), (4, 6), (6, 6)]
    assert [float(m[3]) for m in lines] == [round(point["loss"], 4) for point in recorded]
    assert [m[4] for m in lines] == [f"{point['lr']:.1e}" for point in recorded]
    assert lines[-1][8] == "0:00:00" and all(int(m[6]) > 0 for m in lines)

    # TensorBoard under the run: the loss of every logging step, as metrics.json has it.
    events = _events(run / "logs" / "tensorboard")
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [2, 4, 6]
    assert [s.value for s in scalars] == pytest.approx([point["loss"] for point in recorded], rel=1e-6)
    # The run's options and provenance: a `lorasb` text (the adapter's metadata) and the HParams of the run.
    text = events.Tensors("lorasb/text_summary")[0].tensor_proto.string_val[0].decode()
    record = json.loads(text.removeprefix("```json\n").removesuffix("\n```"))
    config = json.loads((run / adapter.CONFIG_FILE).read_text())
    assert record["base_model"] == config["base_model"] and record["data"] == config["data"]
    assert record["train"] == config["train"]
    assert config["train"]["report_to"] == "tensorboard" and config["train"]["weight_decay"] == 0.01
    assert config["train"]["lora_dropout"] == 0.1 and config["train"]["logging_steps"] == 2
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["weight_decay"].number_value == 0.01 and hparams["method"].string_value == "lora"

    # The logs beside the checkpoints leave them verifiable.
    found = newest_verified_checkpoint(run)
    assert found.checkpoint == run / "checkpoint-6" and found.verified and not found.skipped


def test_overwrite_replaces_a_run_that_left_only_logs_and_keeps_the_new_logs(tiny_model_dir, qa_file, tmp_path):
    run = tmp_path / "run"
    old = run / "logs" / "tensorboard" / "events.out.tfevents.killed"  # a run killed before its first checkpoint
    old.parent.mkdir(parents=True)
    old.write_bytes(b"")
    settings = {"method": "lora", "rank": 4, "max_steps": 4, "logging_steps": 2, "report_to": "tensorboard"}
    train.train(train_config(tiny_model_dir, qa_file, run, overwrite=True, **settings))
    assert not old.exists() and not (tmp_path / ".run.overwrite").exists()
    assert [s.step for s in _events(run / "logs" / "tensorboard").Scalars("train/loss")] == [2, 4]


def test_quiet_and_no_tracker_write_neither_lines_nor_logs(tiny_model_dir, qa_file, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "-m", tiny_model_dir, "-d", qa_file, "--method", "lora", "-r", "4", "--batch-size", "4"]
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in [*args, "--max-steps", "3", "--logging-steps", "1", "-q", "-o", run]])
    out, err = capsys.readouterr()
    assert excinfo.value.code == 0 and out == f"{run}\n" and err == ""
    assert not (run / "logs").exists()
    # The last step logs even when --logging-steps does not divide the steps: the final loss is always recorded.
    settings = {"method": "lora", "rank": 4, "max_steps": 3, "logging_steps": 2}
    summary = train.train(train_config(tiny_model_dir, qa_file, tmp_path / "b", **settings))
    steps = json.loads((tmp_path / "b" / "metrics.json").read_text())["loss"]
    assert [s["step"] for s in steps] == [2, 3] and summary.final_train_loss == steps[-1]["loss"]


@pytest.mark.parametrize(
    ("choice", "hidden", "hint"),
    [
        ("tensorboard", ["tensorboard"], "pip install 'lorasb[tracking]'"),
        ("wandb", ["wandb"], "pip install wandb"),
        ("all", ["tensorboard", "wandb", "mlflow"], "none of tensorboard, wandb, mlflow is installed"),
    ],
)
def test_a_missing_tracker_is_one_line_before_the_model_loads(
    choice, hidden, hint, qa_file, tmp_path, monkeypatch, capsys
):
    for module in hidden:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    # A model that does not exist: the tracker is checked first.
    args = ["train", "-m", tmp_path / "no-model", "-d", qa_file, "--method", "lora", "-r", "4"]
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in [*args, "--report-to", choice, "-o", tmp_path / "run"]])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert excinfo.value.code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"Error: --report-to {choice}") and hint in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_weight_decay_is_adamws_decoupled_decay(tiny_model_dir, qa_file, factors_file, tmp_path):
    """One constant-lr step from the same R0 and batch: Adam's step is the same with or without decay, so the two
    R differ by exactly AdamW's decoupled term, −lr·λ·R0."""
    lr, decay = 5e-2, 2.0
    trained = {}
    for weight_decay in (0.0, decay):
        out = tmp_path / f"wd{weight_decay}"
        settings = {"lr": lr, "weight_decay": weight_decay, "max_steps": 1, "scheduler": "constant"}
        train.train(train_config(tiny_model_dir, qa_file, out, factors=factors_file, **settings))
        trained[weight_decay] = adapter.load_adapter(out).factors
    initial = adapter.load_adapter(factors_file).factors
    for module, (_, start, _) in initial.items():
        moved = trained[decay][module][1] - trained[0.0][module][1]
        assert start.abs().max() > 0
        torch.testing.assert_close(moved, -lr * decay * start, atol=1e-7, rtol=1e-4)


def test_lora_dropout_is_peft_s_and_acts_in_training_only():
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    prepared = {}
    for dropout in (0.0, 0.5):
        method = methods.get_method("lora")
        options = method.resolve_options({"rank": 4, "lora_dropout": dropout})
        base = make_llama()[0]
        modules = models.resolve_targets(base, "all-linear")
        setup = methods.Setup(model=base, modules=modules, rank=4, seed=0, options=options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            prepared[dropout] = method.prepare(setup).model
            for name, param in prepared[dropout].named_parameters():
                if "lora_B" in name:  # B = 0 at init would hide the LoRA branch, and its dropout, entirely
                    torch.nn.init.normal_(param, std=0.5)
        assert prepared[dropout].peft_config["default"].lora_dropout == dropout

    def logits(m, training: bool) -> torch.Tensor:
        m.train(training)
        torch.manual_seed(1)
        with torch.no_grad():
            return m(input_ids=ids).logits

    eval_plain, eval_dropped = logits(prepared[0.0], False), logits(prepared[0.5], False)
    torch.testing.assert_close(eval_dropped, eval_plain, atol=0, rtol=0)  # eval: no dropout, the same weights
    torch.testing.assert_close(logits(prepared[0.0], True), eval_plain, atol=1e-6, rtol=0)  # the base drops nothing
    assert (logits(prepared[0.5], True) - eval_dropped).abs().max() > 1e-3


def test_lora_dropout_is_refused_for_lorasb():
    with pytest.raises(BadInputError, match=r"--lora-dropout applies to --method lora, rslora, dora, .* only"):
        methods.get_method("lorasb").resolve_options({"lora_dropout": 0.1})


def test_wandb_and_mlflow_get_the_record_in_their_run_config(monkeypatch):
    """Stand-ins for the two packages (not installed here): what record_run hands each one's API."""
    calls = []
    run = types.SimpleNamespace(config=types.SimpleNamespace(update=lambda *a, **k: calls.append(("wandb", a, k))))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(run=run))
    mlflow = types.SimpleNamespace(
        active_run=lambda: object(),
        log_params=lambda params: calls.append(("params", params)),
        log_dict=lambda record, name: calls.append(("dict", record, name)),
    )
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    record = {"method": "lora", "rank": 4, "train": {"lr": 0.01, "eval_data": None}, "versions": {"lorasb": "0.1.0"}}
    tracking.record_run(["wandb", "mlflow"], record, [])
    assert calls == [
        ("wandb", ({"lorasb": record},), {"allow_val_change": True}),
        (
            "params",
            {
                "lorasb.lr": 0.01,
                "lorasb.eval_data": "null",
                "lorasb.method": "lora",
                "lorasb.rank": 4,
                "lorasb.lorasb_version": "0.1.0",
            },
        ),
        ("dict", record, "lorasb.json"),
    ]
