"""The HF Trainer `lorasb train` runs: checkpoints that are adapters, and the callbacks that guard and score a run.

Each rank's module holds whole trained tensors (DDP replicas; under --strategy fsdp only the frozen base is sharded,
lorasb_cli/fsdp.py, also under `accelerate launch --use_fsdp --fsdp_version 2`; FSDP1 and DeepSpeed, which would
shard them, are refused by system.launcher_strategy), so global rank 0 (`should_save`) writes checkpoints and every rank reads them on resume,
whatever the strategy of the run that wrote them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME

from . import adapter, tracking
from .errors import IncompatibleArtifactError, RunFailure
from .files import atomic_path, file_sha256
from .tasks import Task
from .tasks.runner import ModelAnswerer, evaluate_rows

log = logging.getLogger("lorasb")

TRAINED_FILE = "trained.safetensors"  # in each checkpoint: the trained tensors by parameter name, float32
# Written last into a checkpoint, after the Trainer's optimizer, scheduler, RNG and state files: it lists every file
# of the checkpoint with its size and sha256, so a checkpoint cut off by a kill, or damaged later (a copy that
# stopped half-way, a flipped bit), is never resumed from.
COMPLETE_FILE = "lorasb-complete.json"
# What resuming exactly needs besides the RNG states (`rng_state.pth`, or one `rng_state_<rank>.pth` per rank): a
# checkpoint without the optimizer or scheduler state would resume silently to another R.
REQUIRED_FILES = (
    adapter.ADAPTER_FILE,
    adapter.CONFIG_FILE,
    TRAINED_FILE,
    OPTIMIZER_NAME,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
)
_RNG_STATE = re.compile(r"rng_state(_\d+)?\.pth")


def checkpoint_record(checkpoint: Path) -> dict:
    """What a complete checkpoint's marker records of its run: the step, and what the run needs to report as a
    whole once resumed (its step-0 losses, the training seconds up to it), and its `files`."""
    return json.loads((checkpoint / COMPLETE_FILE).read_text())


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from: the newest one that verifies, and why each newer one was skipped."""

    checkpoint: Path | None  # None: no checkpoint of the run verifies
    skipped: list[tuple[str, str]]  # (folder name, why it was skipped), newest first
    # False: the checkpoint's marker was written by a lorasb that listed no files, so only the presence of the
    # files resuming needs was checked, not their sizes and hashes.
    verified: bool = True


def newest_verified_checkpoint(out: Path) -> ResumePoint:
    """The newest `checkpoint-N` folder of the run folder `out` whose marker lists every file resuming needs and
    whose files all have their recorded size and sha256; the newer ones that do not are skipped, with the reason."""
    folders = [p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    skipped = []
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        problem, verified = _checkpoint_problem(folder)
        if problem is None:
            return ResumePoint(folder, skipped, verified)
        skipped.append((folder.name, problem))
    return ResumePoint(None, skipped)


def _checkpoint_problem(folder: Path) -> tuple[str | None, bool]:
    """(why `folder` may not be resumed from, or None; whether its files were checked against sizes and hashes)."""
    try:
        record = json.loads((folder / COMPLETE_FILE).read_text())
    except FileNotFoundError:
        return "no completion marker: cut off while it was saved", False
    except (OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return "marker unreadable", False
    if not isinstance(record, dict):
        return "marker unreadable", False
    files = record.get("files")
    verified = files is not None  # an older lorasb's marker lists no files: only their presence can be checked
    if verified and not _is_file_list(files):
        return "marker unreadable", False
    listed = set(files) if verified else {p.name for p in folder.iterdir()}
    missing = [name for name in REQUIRED_FILES if name not in listed]
    if not any(_RNG_STATE.fullmatch(name) for name in listed):
        missing.append("rng_state.pth")
    if missing:
        return f"{', '.join(missing)} missing", verified
    for name, recorded in files.items() if verified else ():
        if (problem := _file_problem(folder / name, recorded)) is not None:
            return f"{name} {problem}", verified
    return None, verified


def _file_problem(path: Path, recorded: dict) -> str | None:
    """How the file at `path` differs from its marker entry `recorded` ({"bytes", "sha256"}), or None."""
    try:
        if not path.is_file():
            return "missing"
        if (size := path.stat().st_size) != recorded["bytes"]:
            return f"is {size} bytes, the marker says {recorded['bytes']}"
        if file_sha256(path) != recorded["sha256"]:
            return "sha256 differs from the marker's"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None


def _is_file_list(files: object) -> bool:
    """Whether `files` is a marker's file list: relative paths inside the checkpoint → {"bytes", "sha256"}."""
    return isinstance(files, dict) and all(
        isinstance(name, str)
        and name
        and not Path(name).is_absolute()
        and ".." not in Path(name).parts
        and isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is not None
        for name, entry in files.items()
    )


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints hold the adapter (`export()` under `adapter_config`: each checkpoint is itself a
    valid adapter) and the trained tensors, instead of the whole model."""

    def __init__(
        self,
        *args,
        adapter_config: dict,
        export: Callable[[], dict[str, torch.Tensor]],
        sharded: bool = False,
        **kwargs,
    ):
        self.adapter_config, self.export = adapter_config, export
        # What each checkpoint's marker records of the run besides its step (checkpoint_record); set by the run.
        self.run_record: Callable[[], dict] = dict
        super().__init__(*args, **kwargs)
        # A model `sharded` by --strategy fsdp takes the Trainer's path for models sharded at load time: no DDP wrap
        # (accelerate refuses DTensor parameters), the whole trained tensors broadcast from rank 0 and their
        # gradients averaged over the ranks at each optimizer step; FSDP2 gathers the base per layer by itself. Set
        # after __init__, which refuses to checkpoint such a model because its optimizer state would be sharded:
        # here the optimizer sees only the whole tensors, so rank 0's optimizer.pt is the whole state.
        self.is_distributed_loading_by_transformers = sharded

    def _init_training_state(self, max_steps, *args, **kwargs) -> tuple[int, int]:
        started = super()._init_training_state(max_steps, *args, **kwargs)
        # A resumed state carries the interrupted run's save, eval and logging intervals; `train --resume` lets
        # --save-steps and --eval-steps change, so the command's own apply from here on.
        self.state.compute_steps(self.args, max_steps)
        return started

    def _save_checkpoint(self, model, trial) -> None:
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        # A folder of this step exists only if resuming skipped it as damaged: none of its files may outlive it.
        if self.args.should_save and folder.exists():
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()  # removed before any rank writes its RNG state into it
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's RNG state is in before the checkpoint counts
        if self.args.should_save:
            files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_FILE)
            record = {"step": self.state.global_step, **self.run_record()}
            record["files"] = {p.relative_to(folder).as_posix(): _file_record(p) for p in files}
            with atomic_path(folder / COMPLETE_FILE) as tmp:
                tmp.write_text(json.dumps(record) + "\n")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            adapter.save_adapter(output_dir, self.export(), self.adapter_config)
            model = self.accelerator.unwrap_model(self.model)
            trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            with atomic_path(Path(output_dir) / TRAINED_FILE) as tmp:
                save_file(trained, tmp)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        saved = load_file(Path(resume_from_checkpoint) / TRAINED_FILE)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(saved) != set(params):
            raise IncompatibleArtifactError(
                "checkpoint holds other trained tensors than this run",
                path=resume_from_checkpoint,
                hint="resume with the --method, --factors and --rank of the interrupted run",
            )
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)


@dataclass(frozen=True)
class StepStats:
    """A logging step of a run (`--logging-steps`, and the last step): `step` of `total`; the mean training loss
    since the previous logging step, the learning rate and the gradient norm (None: not measured) as the Trainer
    logged them; input tokens (padding excluded) per second of this process's training; seconds of training so far,
    a resumed run's earlier ones included; and seconds left at this process's pace."""

    step: int
    total: int
    loss: float
    lr: float | None
    grad_norm: float | None
    tokens_per_second: float | None
    elapsed: float
    eta: float


class StepLog(TrainerCallback):
    """Reports each step to `progress(step, steps)` and each logging step's StepStats to `log_step` (global rank 0
    only), and makes the last step a logging step too, so the run's final training loss is always logged.
    `seconds()`: the run's training seconds so far."""

    def __init__(
        self,
        progress: Callable[[int, int], None] | None,
        log_step: Callable[[StepStats], None] | None,
        seconds: Callable[[], float],
    ):
        self.progress, self.log_step, self.seconds = progress, log_step, seconds
        self.first_step: int | None = None  # the step this process started from, minus one

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step is None:
            self.first_step = state.global_step - 1
        if state.global_step >= state.max_steps:
            control.should_log = True
        if self.progress is not None and state.is_world_process_zero:
            self.progress(state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.log_step is None or not state.is_world_process_zero or "loss" not in (logs or {}):
            return  # an eval's or the run's closing log
        step, total, first = state.global_step, state.max_steps, self.first_step or 0
        runtime = logs.get("train_runtime")  # seconds of this process's training (Trainer.log's speed metrics)
        pace = runtime / (step - first) if runtime is not None and step > first else 0.0
        self.log_step(
            StepStats(
                step=step,
                total=total,
                loss=logs["loss"],
                lr=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                tokens_per_second=logs.get("train_tokens_per_second"),
                elapsed=self.seconds(),
                eta=pace * (total - step),
            )
        )


class RecordRun(TrainerCallback):
    """At the start of training, puts the run's `record` into the config of each tracker of `trackers`
    (tracking.record_run), whose integrations are among `callbacks` (the Trainer's callback list); global rank 0."""

    def __init__(self, trackers: Sequence[str], record: dict, callbacks: Sequence[TrainerCallback]):
        self.trackers, self.record, self.callbacks = trackers, record, callbacks

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            tracking.record_run(self.trackers, self.record, self.callbacks)


class DivergenceGuard(TrainerCallback):
    """Stops on NaN/Inf in a trained tensor before a checkpoint could save it, naming the newest checkpoint in `out`
    that verifies."""

    def __init__(self, out: Path):
        self.out = out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for name, param in model.named_parameters():
            if param.requires_grad and not torch.isfinite(param).all():
                # A resumed run keeps its options (train refuses new ones), so the way out is a new run.
                last = newest_verified_checkpoint(self.out).checkpoint
                raise RunFailure(
                    f"training diverged: NaN/Inf in {name} at step {state.global_step}",
                    hint=(f"the last good checkpoint, {last}, is kept; " if last else "")
                    + "start a new run (another -o, or --overwrite) with a lower --lr or --dtype float32",
                )


class TaskEval(TrainerCallback):
    """Scores the model on `task` every `eval_steps` steps and at the end; `results` holds one dict per score."""

    def __init__(
        self,
        task: Task,
        rows: Sequence[dict],
        tokenizer,
        *,
        template: str | None,
        system_prompt: str | None,
        batch_size: int,
        eval_steps: int | None,
        max_length: int,
    ):
        self.task, self.rows, self.tokenizer, self.template = task, rows, tokenizer, template
        self.system_prompt = system_prompt
        self.batch_size, self.eval_steps, self.max_length = batch_size, eval_steps, max_length
        self.results: list[dict] = []

    def score(self, model: nn.Module, step: int) -> None:
        if self.results and self.results[-1]["step"] == step:
            return
        model.eval()
        answerer = ModelAnswerer(
            model,
            self.tokenizer,
            template=self.template,
            system_prompt=self.system_prompt,
            batch_size=self.batch_size,
            max_length=self.max_length,
        )
        metrics = self.task.score(evaluate_rows(self.task, self.rows, answerer, answerer.template))
        model.train()
        self.results.append({"step": step, "task": self.task.name, **metrics})
        log.info(
            "step %d: %s %s",
            step,
            self.task.name,
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)),
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self.score(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.score(model, state.global_step)


class SaveAtSteps(TrainerCallback):
    """A checkpoint (itself an adapter) at each of `steps` besides --save-steps': what compare scores a learning
    curve on."""

    def __init__(self, steps: Sequence[int]):
        self.steps = frozenset(steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


class StopOnSignal(TrainerCallback):
    """SIGINT and SIGTERM (what schedulers send before preemption) end the run at the end of the current step with
    a checkpoint; `signal` is then the signal's number. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s: saving a checkpoint at the end of this step, then stopping", signal.Signals(signum).name)

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal is not None:
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
