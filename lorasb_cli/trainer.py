"""The HF Trainer `lorasb train` runs: checkpoints that are adapters, and the callbacks that guard and score a run.

Each rank's module holds whole parameters (DDP replicas; FSDP and DeepSpeed, which would shard them, are refused by
system.check_launcher), so global rank 0 (`should_save`) writes checkpoints and every rank reads them on resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from . import adapter, artifacts
from .errors import IncompatibleArtifactError, RunFailure
from .tasks import Task
from .tasks.runner import ModelAnswerer, evaluate_rows

log = logging.getLogger("lorasb")

TRAINED_FILE = "trained.safetensors"  # in each checkpoint: the trained tensors by parameter name, float32


class AdapterTrainer(Trainer):
    """A Trainer whose checkpoints hold the adapter (`export()` under `adapter_config`: each checkpoint is itself a
    valid adapter) and the trained tensors, instead of the whole model."""

    def __init__(self, *args, adapter_config: dict, export: Callable[[], dict[str, torch.Tensor]], **kwargs):
        self.adapter_config, self.export = adapter_config, export
        super().__init__(*args, **kwargs)

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
                last = get_last_checkpoint(str(self.out))
                raise RunFailure(
                    f"training diverged: NaN/Inf in {name} at step {state.global_step}",
                    hint=(f"last good checkpoint: {last}; " if last else "")
                    + "lower --lr or use --dtype float32, then --resume",
                )


class TaskEval(TrainerCallback):
    """Scores the model on `task` every `eval_steps` steps and at the end; `results` holds one dict per score."""

    def __init__(self, task: Task, rows: Sequence[dict], tokenizer, *, template: str, batch_size: int,
                 eval_steps: int | None, max_length: int):  # fmt: skip
        self.task, self.rows, self.tokenizer, self.template = task, rows, tokenizer, template
        self.batch_size, self.eval_steps, self.max_length = batch_size, eval_steps, max_length
        self.results: list[dict] = []

    def score(self, model: nn.Module, step: int) -> None:
        if self.results and self.results[-1]["step"] == step:
            return
        model.eval()
        answerer = ModelAnswerer(model, self.tokenizer, template=self.template, batch_size=self.batch_size,
                                 max_new_tokens=self.task.max_new_tokens, max_length=self.max_length)  # fmt: skip
        metrics = self.task.score(evaluate_rows(self.task, self.rows, answerer, answerer.template))
        model.train()
        self.results.append({"step": step, "task": self.task.name, **metrics})
        log.info("step %d: %s %s", step, self.task.name,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))  # fmt: skip

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self.score(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.score(model, state.global_step)
