"""The HF Trainer `lorasb train` runs: checkpoints that are adapters, and the callbacks that guard and score a run.

Each rank's module holds whole parameters (DDP replicas; FSDP and DeepSpeed, which would shard them, are refused by
system.check_launcher), so global rank 0 (`should_save`) writes checkpoints and every rank reads them on resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback

from . import adapter, artifacts
from .errors import IncompatibleArtifactError, RunFailure
from .tasks import Task
from .tasks.runner import ModelAnswerer, evaluate_rows

log = logging.getLogger("lorasb")

TRAINED_FILE = "trained.safetensors"  # in each checkpoint: the trained tensors by parameter name, float32
# Written last into a checkpoint, after the Trainer's optimizer, scheduler, RNG and state files: a checkpoint
# without it was cut off by a kill and is never resumed from.
COMPLETE_FILE = "lorasb-complete.json"


def checkpoint_record(checkpoint: Path) -> dict:
    """What a complete checkpoint's marker records of its run: the step, and what the run needs to report as a
    whole once resumed (its step-0 losses, the training seconds up to it)."""
    return json.loads((checkpoint / COMPLETE_FILE).read_text())


def last_complete_checkpoint(out: Path) -> Path | None:
    """The run folder's newest complete `checkpoint-N` folder, or None."""
    complete = [
        p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and (p / COMPLETE_FILE).is_file()
    ]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints hold the adapter (`export()` under `adapter_config`: each checkpoint is itself a
    valid adapter) and the trained tensors, instead of the whole model."""

    def __init__(self, *args, adapter_config: dict, export: Callable[[], dict[str, torch.Tensor]], **kwargs):
        self.adapter_config, self.export = adapter_config, export
        # What each checkpoint's marker records of the run besides its step (checkpoint_record); set by the run.
        self.run_record: Callable[[], dict] = dict
        super().__init__(*args, **kwargs)

    def _init_training_state(self, max_steps, *args, **kwargs) -> tuple[int, int]:
        started = super()._init_training_state(max_steps, *args, **kwargs)
        # A resumed state carries the interrupted run's save, eval and logging intervals; `train --resume` lets
        # --save-steps and --eval-steps change, so the command's own apply from here on.
        self.state.compute_steps(self.args, max_steps)
        return started

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank's RNG state is in before the checkpoint counts
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            with artifacts.atomic_path(folder / COMPLETE_FILE) as tmp:
                tmp.write_text(json.dumps({"step": self.state.global_step, **self.run_record()}) + "\n")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            adapter.save_adapter(output_dir, self.export(), self.adapter_config)
            model = self.accelerator.unwrap_model(self.model)
            trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            with artifacts.atomic_path(Path(output_dir) / TRAINED_FILE) as tmp:
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


class DivergenceGuard(TrainerCallback):
    """Reports each step to `progress(step, steps)` and stops on NaN/Inf in a trained tensor before a checkpoint
    could save it, naming the last good checkpoint in `out`."""

    def __init__(self, progress: Callable[[int, int], None] | None, out: Path):
        self.progress, self.out = progress, out

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.progress is not None:
            self.progress(state.global_step, state.max_steps)
        for name, param in model.named_parameters():
            if param.requires_grad and not torch.isfinite(param).all():
                # A resumed run keeps its options (train refuses new ones), so the way out is a new run.
                last = last_complete_checkpoint(self.out)
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
        template: str,
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
