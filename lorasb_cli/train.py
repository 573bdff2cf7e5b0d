"""`lorasb train`: train only R on HF Trainer (so accelerate, DDP, FSDP and DeepSpeed work through their
launchers) and write the adapter directory: adapter.safetensors, adapter_config.json, metrics.json, loss.png.

Checkpoints hold the adapter (R, plus the frozen B and A, so each one is itself a valid adapter), the
optimizer, scheduler and RNG states: `--resume` continues to exactly the R of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import adapter, artifacts, data, models, system
from .errors import BadInputError, IncompatibleArtifactError, RunFailure

log = logging.getLogger("lorasb")

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass(frozen=True)
class TrainConfig:
    model: str
    factors: str
    data: str
    out: str
    split: str = "train"
    size: int | None = None
    format: str = "auto"
    eval_data: str | None = None
    lr: float = 1e-3
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    scheduler: str = "linear"
    max_length: int = 512
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    save_steps: int = 500
    eval_steps: int | None = None
    eval_task: str | None = None
    init_scale: float | str = 1.0  # or "auto"
    resume: bool = False
    overwrite: bool = False
    trust_remote_code: bool = False


@dataclass
class TrainSummary:
    path: Path
    steps: int
    trainable_params: int
    base_params: int
    lora_params_same_rank: int
    step0_base_loss: float | None
    step0_init_loss: float | None
    final_train_loss: float | None
    final_eval_loss: float | None
    seconds: float
    tokens_per_second: float
    peak_memory_bytes: int


def load_factors(path: str) -> tuple[artifacts.Artifact, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The factors file and its {module: (B [m, r], R [r, r], A [r, n])} in float32."""
    artifact = artifacts.Artifact(path, kinds=("factors",))
    modules = artifacts.factor_modules(artifact)
    if not modules:
        raise IncompatibleArtifactError("factors file holds no modules", path=artifact.path, hint="re-run decompose")
    factors = {m: tuple(artifact.get(f"{m}.{s}", torch.float32) for s in artifacts.FACTOR_SUFFIXES) for m in modules}
    return artifact, factors


def check_factors_fit(
    factors: dict[str, tuple[torch.Tensor, ...]], shapes: dict[str, tuple[int, int]], model_id: str, path: str
) -> None:
    """Every factor module must be a linear layer of the model with weight shape (B rows, A columns)."""
    for module, (lora_B, _, lora_A) in factors.items():
        want = (lora_B.shape[0], lora_A.shape[1])
        if module not in shapes:
            raise IncompatibleArtifactError(
                f"factors name module '{module}', which model '{model_id}' lacks",
                path=path,
                hint="pass the model the update was estimated on, or re-run estimate on this one",
            )
        if tuple(shapes[module]) != want:
            raise IncompatibleArtifactError(
                f"factors of '{module}' are for a {want[0]}×{want[1]} weight, model '{model_id}' has "
                f"{shapes[module][0]}×{shapes[module][1]}",
                path=path,
                hint="pass the model the update was estimated on",
            )


def trainable_summary(model: nn.Module, layers: dict[str, adapter.LoraSBLinear]) -> tuple[int, int, int]:
    """(trainable parameters, base parameters, parameters of LoRA at the same rank and targets)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)
    lora = sum(layer.rank * (layer.lora_B.shape[0] + layer.lora_A.shape[1]) for layer in layers.values())
    return trainable, base, lora


@torch.no_grad()
def mean_loss(model: nn.Module, examples: Sequence[data.Example], batch_size: int, pad_id: int) -> float:
    """Mean over samples of each sample's mean supervised-token loss (forward passes only)."""
    from .estimate import model_inputs, per_sample_loss_sum

    device = next(model.parameters()).device
    total = 0.0
    for batch in data.make_batches(examples, batch_size, pad_id):
        logits = model(**model_inputs(batch, device)).logits
        total += float(per_sample_loss_sum(logits, batch["labels"].to(device))[0])
    return total / max(1, len(examples))


# Factors of R_init that `--init-scale auto` tries: 10^(k/2) from 0.001 to 100 (η ± 3 decades).
INIT_SCALE_GRID = tuple(10 ** (k / 2) for k in range(-6, 5))


@torch.no_grad()
def choose_init_scale(
    layers: dict[str, adapter.LoraSBLinear], probe_loss: Callable[[], float]
) -> tuple[float, list[tuple[float, float]]]:
    """The factor of R_init, from INIT_SCALE_GRID, with the lowest probe loss (forward passes only).

    η only scales R_init (B and A do not depend on it), so the size of the simulated first step can be
    chosen after the fact. Returns the factor and the (factor, loss) curve; R is left as it was.
    """
    initial = {name: layer.lora_R.detach().clone() for name, layer in layers.items()}
    curve = []
    for factor in INIT_SCALE_GRID:
        for name, layer in layers.items():
            layer.lora_R.copy_(initial[name] * factor)
        curve.append((factor, probe_loss()))
    for name, layer in layers.items():
        layer.lora_R.copy_(initial[name])
    return min(curve, key=lambda point: point[1])[0], curve


def _checkpoint_trainer_class():
    """A Trainer whose checkpoints hold the adapter instead of the whole model."""
    from transformers import Trainer

    class AdapterTrainer(Trainer):
        adapter_config: dict = {}

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                model = self.accelerator.unwrap_model(self.model)
                adapter.save_adapter(output_dir, adapter.adapter_tensors(model), self.adapter_config)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            saved = adapter.load_adapter(resume_from_checkpoint)
            model = self.accelerator.unwrap_model(model or self.model)
            layers = {n: m for n, m in model.named_modules() if isinstance(m, adapter.LoraSBLinear)}
            if set(saved.factors) != set(layers):
                raise IncompatibleArtifactError(
                    "checkpoint modules differ from this run's factors", path=resume_from_checkpoint
                )
            with torch.no_grad():
                for name, (_, lora_R, _) in saved.factors.items():
                    layers[name].lora_R.copy_(lora_R)
            adapter.load_extra(model, saved.extra, trainable=True)

    return AdapterTrainer


def _callbacks(progress: Callable[[int, int], None] | None, out: Path):
    from transformers import TrainerCallback

    class Guard(TrainerCallback):
        """Stop on NaN/Inf in R before a checkpoint could save it, naming the last good checkpoint."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if progress is not None:
                progress(state.global_step, state.max_steps)
            for name, param in model.named_parameters():
                if param.requires_grad and not torch.isfinite(param).all():
                    from transformers.trainer_utils import get_last_checkpoint

                    last = get_last_checkpoint(str(out))
                    raise RunFailure(
                        f"training diverged: NaN/Inf in {name} at step {state.global_step}",
                        hint=(f"last good checkpoint: {last}; " if last else "")
                        + "lower --lr or use --dtype float32, then --resume",
                    )

    return [Guard()]


def _task_callback(task_name: str, rows: list[dict], tokenizer, batch_size: int, eval_steps: int | None,
                   max_length: int, results: list[dict]):  # fmt: skip
    """Score the model on `task_name` every `eval_steps` steps and at the end; appends to `results`."""
    from transformers import TrainerCallback

    from .evaluate import ModelAnswerer, evaluate_rows
    from .tasks import get_task

    task = get_task(task_name)

    class TaskEval(TrainerCallback):
        def _score(self, model, step: int) -> None:
            if results and results[-1]["step"] == step:
                return
            model.eval()
            answerer = ModelAnswerer(model, tokenizer, batch_size=batch_size, max_new_tokens=task.max_new_tokens,
                                     max_length=max_length)  # fmt: skip
            metrics = task.score(evaluate_rows(task, rows, answerer))
            model.train()
            results.append({"step": step, "task": task_name, **metrics})
            log.info("step %d: %s %s", step, task_name,
                     ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))  # fmt: skip

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if eval_steps and state.global_step % eval_steps == 0:
                self._score(model, state.global_step)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self._score(model, state.global_step)

    return TaskEval()


def _prepare_out(config: TrainConfig) -> Path:
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise BadInputError("output exists and is not a directory", path=str(out), hint="pass a directory to -o")
    if out.is_dir() and any(out.iterdir()) and not (config.resume or config.overwrite):
        raise BadInputError(
            "output directory exists and is not empty",
            path=str(out),
            hint="pass --resume to continue its run, --overwrite to replace it, or another -o",
        )
    if config.resume:
        from transformers.trainer_utils import get_last_checkpoint

        if not out.is_dir() or get_last_checkpoint(str(out)) is None:
            raise BadInputError("--resume: no checkpoint-* directory to resume from", path=str(out))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _check_options(config: TrainConfig) -> None:
    checks = [
        (config.lr > 0, f"--lr {config.lr} must be positive"),
        (config.batch_size >= 1, f"--batch-size {config.batch_size} must be positive"),
        (config.grad_accum >= 1, f"--grad-accum {config.grad_accum} must be positive"),
        (0 <= config.warmup_ratio < 1, f"--warmup-ratio {config.warmup_ratio} must be in [0, 1)"),
        (config.max_steps != 0, "--max-steps 0 trains nothing"),
        (config.epochs > 0, f"--epochs {config.epochs} must be positive"),
        (config.save_steps >= 1, f"--save-steps {config.save_steps} must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise BadInputError(message)
    if config.init_scale != "auto" and not (isinstance(config.init_scale, float) and math.isfinite(config.init_scale)):
        raise BadInputError(f"--init-scale {config.init_scale} must be auto or a finite number")
    if config.eval_task and not config.eval_data:
        raise BadInputError("--eval-task needs --eval-data", hint="pass the held-out file the task should score")
    if config.scheduler not in SCHEDULERS:
        raise BadInputError(f"unknown --scheduler '{config.scheduler}'", hint=models.did_you_mean(config.scheduler, SCHEDULERS))


def train(
    config: TrainConfig,
    progress: Callable[[int, int], None] | None = None,
    callbacks: Sequence[object] = (),
) -> TrainSummary:
    """Train R of every factor module on `config.data`; returns what was written and measured."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    _check_options(config)
    factors_file, factors = load_factors(config.factors)
    ref = models.resolve_model(config.model)
    # Compare against the architecture from config.json before loading any weights.
    labels = factors_file.meta.get("labels")
    head = "sequence-classification" if labels is not None else "causal-lm"
    shapes = models.linear_shapes_from_config(ref, trust_remote_code=config.trust_remote_code, head=head)
    check_factors_fit(factors, shapes, ref.id, factors_file.path)
    fingerprint = models.fingerprint({m: shapes[m] for m in factors})
    if fingerprint != factors_file.meta["base_model"]["fingerprint"]:
        raise IncompatibleArtifactError(
            "factors come from a model with other target modules", path=factors_file.path,
            hint="pass the model the update was estimated on",
        )  # fmt: skip
    if factors_file.meta["base_model"]["id"] != ref.id:
        log.warning("factors were estimated on %s; training on %s", factors_file.meta["base_model"]["id"], ref.id)
    eta = factors_file.meta.get("eta")
    if eta is not None and not math.isclose(eta, config.lr):
        log.warning("--lr %g differs from the η %g the update was estimated with", config.lr, eta)

    train_set = data.load_dataset_rows(config.data, config.split, size=config.size, seed=config.seed)
    fmt = data.detect_format(list(train_set.rows[0]), config.format, train_set.source)
    # A built-in name as --eval-data means its test split: never the rows trained on.
    eval_set = data.load_dataset_rows(config.eval_data, "test", seed=config.seed) if config.eval_data else None
    out = _prepare_out(config)

    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    model, tokenizer = models.load_model(
        ref, dtype=dtype, device=device, trust_remote_code=config.trust_remote_code, head=head, labels=labels
    )
    train_examples = data.encode(train_set.rows, fmt, tokenizer, config.max_length, labels)
    eval_examples = data.encode(eval_set.rows, fmt, tokenizer, config.max_length, labels) if eval_set else None
    auto = config.init_scale == "auto"
    if auto and not eval_examples:
        # `auto` picks the scale on data training never sees: a slice held out of the training set.
        held = max(1, min(32, len(train_examples) // 10))
        train_examples, probe = train_examples[:-held], train_examples[-held:]
    else:
        probe = eval_examples or train_examples[: min(64, len(train_examples))]

    layers = adapter.inject(model, factors, scale=float(factors_file.meta.get("scale", 1.0)))
    # A classifier's head starts as the one G was estimated with and trains with R (PEFT's modules_to_save).
    adapter.load_extra(model, {n: factors_file.get(n) for n in factors_file.meta.get("head", [])}, trainable=True)
    trainable, base_params, lora_params = trainable_summary(model, layers)
    log.info(
        "trainable parameters: %s (%.4f%% of the base model's %s; LoRA at rank %d on the same targets: %s, %.1f× more)",
        f"{trainable:,}", 100 * trainable / base_params, f"{base_params:,}", factors_file.meta["rank"],
        f"{lora_params:,}", lora_params / trainable,
    )  # fmt: skip

    init_scale, curve = 1.0 if auto else float(config.init_scale), None
    if auto and not config.resume:  # on resume the checkpoint's R replaces the initial one anyway
        init_scale, curve = choose_init_scale(layers, lambda: mean_loss(model, probe, config.batch_size,
                                                                        tokenizer.pad_token_id))  # fmt: skip
        log.info("--init-scale auto: probe loss by scale %s → %g",
                 ", ".join(f"{k:g}: {v:.4f}" for k, v in curve), init_scale)  # fmt: skip
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_R.mul_(init_scale)

    step0_base = step0_init = None
    if not config.resume:
        step0_init = mean_loss(model, probe, config.batch_size, tokenizer.pad_token_id)
        for layer in layers.values():
            layer.scale, saved_scale = 0.0, layer.scale
        step0_base = mean_loss(model, probe, config.batch_size, tokenizer.pad_token_id)
        for layer in layers.values():
            layer.scale = saved_scale
        log.info(
            "step-0 loss on %d %s samples: base %.4f, initialized %.4f",
            len(probe), "eval" if eval_examples else "held-out training" if auto else "training", step0_base,
            step0_init,
        )  # fmt: skip
        if step0_init > step0_base:
            log.warning(
                "the initialized model is worse than the base (%.4f > %.4f): η is too large for this model; "
                "re-run estimate with a smaller --eta or pass --init-scale below 1",
                step0_init, step0_base,
            )  # fmt: skip

    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad-requiring input
    adapter_config = {
        "base_model": ref.provenance(fingerprint),
        "targets": factors_file.meta["targets"],
        "target_modules": list(factors),
        "rank": factors_file.meta["rank"],
        "scale": float(factors_file.meta.get("scale", 1.0)),
        "method": "lorasb",
        "init": factors_file.meta.get("init", "lorasb"),
        "init_scale": init_scale,
        "init_scale_curve": curve,
        "eta": eta,
        "data": {**train_set.provenance(), "format": fmt},
        "train": {k: v for k, v in asdict(config).items() if k not in ("out", "resume", "overwrite")},
        **{key: factors_file.meta[key] for key in ("architecture", "labels", "head") if key in factors_file.meta},
    }

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=0.0,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_ratio,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        eval_strategy="steps" if eval_examples and config.eval_steps else "no",
        eval_steps=config.eval_steps,
        seed=config.seed,
        activation_checkpointing=config.gradient_checkpointing,
        use_cpu=device.type == "cpu",
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        optim="adamw_torch",
    )
    trainer_class = _checkpoint_trainer_class()
    trainer_class.adapter_config = adapter_config
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_examples,
        eval_dataset=eval_examples,
        data_collator=lambda batch: data.collate(batch, tokenizer.pad_token_id),
        callbacks=[*_callbacks(progress, out), *callbacks],
    )
    task_results: list[dict] = []
    if config.eval_task:
        trainer.add_callback(_task_callback(config.eval_task, eval_set.rows, tokenizer, config.batch_size,
                                            config.eval_steps, config.max_length, task_results))  # fmt: skip
    for noisy in (PrinterCallback, ProgressCallback):  # they print to stdout; we report on stderr
        trainer.remove_callback(noisy)

    start = time.perf_counter()
    resume_from = get_last_checkpoint(str(out)) if config.resume else None
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    final_eval = trainer.evaluate()["eval_loss"] if eval_examples else None

    tensors = adapter.adapter_tensors(model)
    adapter.save_adapter(out, tensors, adapter_config)
    history = trainer.state.log_history
    steps = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")} for h in history if "loss" in h]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]
    tokens_per_second = trainer.state.num_input_tokens_seen / seconds if seconds > 0 else 0.0
    summary = TrainSummary(
        path=out,
        steps=trainer.state.global_step,
        trainable_params=trainable,
        base_params=base_params,
        lora_params_same_rank=lora_params,
        step0_base_loss=step0_base,
        step0_init_loss=step0_init,
        final_train_loss=steps[-1]["loss"] if steps else None,
        final_eval_loss=final_eval,
        seconds=seconds,
        tokens_per_second=tokens_per_second,
        peak_memory_bytes=system.peak_memory_bytes(device),
    )
    metrics = {**asdict(summary), "path": str(out), "train_loss_mean": result.training_loss, "loss": steps, "eval": evals,
               "task": task_results}
    with artifacts.atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    plot_losses(steps, evals, out / "loss.png")
    return summary


def plot_losses(steps: list[dict], evals: list[dict], path: Path) -> None:
    """Train (per step) and eval loss curves as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train", lw=1.2)
    if evals:
        ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="eval", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("lorasb train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
