"""`lorasb train`: train with `--method` (default `lorasb`: only R) on HF Trainer (so DDP runs under torchrun and
`accelerate launch --multi_gpu`, and `--strategy fsdp` (or `accelerate launch --use_fsdp --fsdp_version 2`) shards
the frozen base with FSDP2; FSDP1 and DeepSpeed are refused) and write the adapter directory: adapter.safetensors, adapter_config.json,
metrics.json, loss.png. The methods live in lorasb_cli/methods.

Checkpoints hold the adapter (so each one is itself a valid adapter), the trained tensors, the optimizer,
scheduler and RNG states: `--resume` continues to exactly the weights of an uninterrupted run.

Read top-down: `train` (the entry point) → `_train_locked` (the run lock, `--overwrite`, `--resume`) → reading and
checking the inputs → `_train_and_write` (load the model, `_prepare_method`, `_make_trainer`, `_fit`) →
`_write_run` (the run folder).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from . import (
    adapter,
    artifacts,
    data,
    files,
    fsdp,
    linalg,
    loss,
    lr_range,
    metadata,
    methods,
    models,
    quantization,
    system,
    templates,
    tracking,
)
from .configs import TrainConfig
from .errors import BadInputError, IncompatibleArtifactError, Interrupted, LorasbError
from .options import MAX_LENGTH
from .registry import did_you_mean
from .trainer import (
    COMPLETE_FILE,
    AdapterTrainer,
    DivergenceGuard,
    RecordRun,
    StepLog,
    StepStats,
    StopOnSignal,
    TaskEval,
    checkpoint_record,
    newest_verified_checkpoint,
)

log = logging.getLogger("lorasb")

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


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


@artifacts.honours_allow_unverified
def train(
    config: TrainConfig,
    progress: Callable[[int, int], None] | None = None,
    callbacks: Sequence[object] = (),
    log_step: Callable[[StepStats], None] | None = None,
) -> TrainSummary:
    """Train `config.method` on `config.data`; returns what was written and measured. `progress(step, steps)` is
    called after each step, `log_step` with each logging step's StepStats (--logging-steps, and the last step).

    One run at a time writes into `config.out` (a lock file); `--overwrite` writes the new run beside the old one
    and replaces it once finished; `--resume` continues from its newest complete checkpoint with the options the
    run was started with, and a finished run resumed is left as it is. SIGINT/SIGTERM end the run with a
    checkpoint (`Interrupted`, exit 130/143)."""
    config = replace(config, strategy=system.launcher_strategy(config.strategy))
    method, method_options = _check_options(config)
    ref = models.resolve_model(config.model)
    max_length = models.fit_max_length(config.max_length, MAX_LENGTH, ref, trust_remote_code=config.trust_remote_code)
    config = replace(config, max_length=max_length)
    existed = Path(config.out).expanduser().exists()
    inputs = _read_inputs(config, method, method_options)
    main = system.is_main_process()
    try:
        return _train_locked(config, inputs, main, progress, callbacks, log_step)
    except BaseException:
        if main and not existed:
            with contextlib.suppress(OSError):  # a run that failed before writing anything leaves no folder
                inputs.out.rmdir()
        raise


def _train_locked(config: TrainConfig, inputs: _Inputs, main: bool, progress, callbacks, log_step) -> TrainSummary:
    with files.folder_lock(inputs.out, "lorasb train") if main else contextlib.nullcontext():
        if config.overwrite and any(p.name != files.LOCK_FILE for p in inputs.out.iterdir()):
            return _overwrite(config, inputs, main, progress, callbacks, log_step)
        resume_from = None
        if config.resume:
            finished = inputs.out / "metrics.json"  # written last, after the final adapter
            if finished.is_file() and (inputs.out / adapter.ADAPTER_FILE).is_file():
                _check_same_run(inputs.out, config, inputs, finished=True)
                log.warning("the run in %s finished: nothing to resume", inputs.out)
                return _finished_summary(finished, inputs.out)
            resume_from = _resume_point(config, inputs)
        return _train_and_write(config, inputs, resume_from, progress, callbacks, log_step)


# What marks a folder as a run of lorasb train (any of them): only such a folder may be replaced by --overwrite.
# A tracker's logs are one: a run killed before its first checkpoint leaves them.
_RUN_MARKS = (adapter.CONFIG_FILE, "metrics.json", "checkpoint-*", *tracking.RUN_MARKS)


def _overwrite(config: TrainConfig, inputs: _Inputs, main: bool, progress, callbacks, log_step) -> TrainSummary:
    """--overwrite of a run: the new run is written in a hidden folder beside it and takes its place only once it
    has finished, so a new run that fails, diverges or is interrupted leaves the old run as it was."""
    if not any(any(inputs.out.glob(mark)) for mark in _RUN_MARKS):
        raise BadInputError(
            "--overwrite replaces a run of lorasb train; this folder holds other files",
            path=str(inputs.out),
            hint="pick another -o, or empty the folder yourself",
        )
    # One name every process of a launcher's job agrees on; a killed overwrite's leftover is removed first.
    work = inputs.out.parent / f".{inputs.out.name}.overwrite"
    if main:
        shutil.rmtree(work, ignore_errors=True)
    try:
        summary = _train_and_write(config, replace(inputs, work=work), None, progress, callbacks, log_step)
    except BaseException as e:
        if main:
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, LorasbError):  # its checkpoint went with the discarded run
            e.hint = f"--overwrite: the new run was discarded and the run in {inputs.out} is as it was"
        raise
    if main:
        files.swap_folder(work, inputs.out)
    return summary


def _finished_summary(metrics_file: Path, out: Path) -> TrainSummary:
    metrics = json.loads(metrics_file.read_text())
    return TrainSummary(**{f.name: metrics[f.name] for f in fields(TrainSummary) if f.name != "path"}, path=out)


@dataclass
class _Inputs:
    """What a run reads, checked before any weight is loaded."""

    method: methods.Method
    options: methods.MethodOptions
    ref: models.ModelRef
    factors: artifacts.FactorsFile | None
    train_set: data.Dataset
    eval_set: data.Dataset | None
    fmt: str
    template: str | None
    system_prompt: str | None
    labels: Sequence[str] | None
    out: Path
    work: Path  # where the run writes: `out`, or with --overwrite of a run the folder that will replace it


def _read_inputs(config: TrainConfig, method: methods.Method, method_options: methods.MethodOptions) -> _Inputs:
    ref = models.resolve_model(config.model)
    factors = _load_factors_checked(config, ref) if method.needs_factors else None
    train_set = data.load_dataset_rows(
        config.data, config.split, config.data_config, size=config.size, seed=config.seed, fields=config.fields
    )
    floats = data.float_labels(train_set.rows)
    fmt = data.detect_format(train_set.columns, config.format, train_set.source, floats=floats)
    template = templates.resolve(config.template, train_set.columns, fmt, announce=True)
    system_prompt = templates.system_prompt(config.system_prompt, template, train_set.rows)
    if factors is not None:
        templates.check_same(factors.meta.template, template, "the estimate", force=config.force_template)
    # A built-in name as --eval-data means its test split: never the rows trained on.
    eval_set = (
        data.load_dataset_rows(config.eval_data, "test", config.data_config, seed=config.seed, fields=config.fields)
        if config.eval_data
        else None
    )
    train_set, eval_set = (rows and data.checked(rows, fmt) for rows in (train_set, eval_set))  # before step 1
    labels = factors.meta.labels if factors is not None else data.head_labels(fmt, train_set.rows)
    for dataset in (train_set, eval_set) if eval_set else (train_set,):
        data.check_labels(dataset.rows, fmt, labels, dataset.source)
    out = _prepare_out(config, ref)
    return _Inputs(
        method, method_options, ref, factors, train_set, eval_set, fmt, template, system_prompt, labels, out, out
    )


def _prepare_out(config: TrainConfig, ref: models.ModelRef) -> Path:
    inputs = {
        "model": ref.path,
        "data": config.data,
        "eval data": config.eval_data,
        "factors": config.factors,
        "init adapter": config.init_adapter,
    }
    out = files.check_output_dir(
        config.out,
        inputs,
        allow_nonempty=config.resume or config.overwrite,
        hint="pass --resume to continue its run, --overwrite to replace it, or another -o",
    )
    if config.resume and not out.is_dir():
        raise BadInputError(
            "--resume: no checkpoint to resume from: the run folder does not exist",
            path=str(out),
            hint="pass the -o of the interrupted run",
        )
    # Under a launcher every rank checks the same folder here: rank 0 writes nothing into it before the Trainer's
    # process group forms, which waits for every rank to have passed this point.
    files.make_output_folder(out)
    return out


def _check_options(config: TrainConfig) -> tuple[methods.Method, methods.MethodOptions]:
    """The checked options (each number is in its declared range already): the method, and its own options
    resolved from those given; the --report-to tracker is installed."""
    if config.max_steps == 0:
        raise BadInputError("--max-steps 0 trains nothing", hint="pass -1 to train --epochs, or a step count")
    if config.resume and config.overwrite:
        raise BadInputError("--resume continues the run in -o and --overwrite replaces it", hint="pass one of them")
    if config.eval_task and not config.eval_data:
        raise BadInputError("--eval-task needs --eval-data", hint="pass the held-out file the task should score")
    fsdp.check_supported(config.strategy, config.quantize)
    method = methods.get_method(config.method)
    if config.quantize and not method.quantized_base:
        users = ", ".join(m.name for m in methods.METHODS.values() if m.quantized_base)
        raise BadInputError(
            f"--method {method.name} reads or trains the base weights W0, which --quantize {config.quantize} packs",
            hint=f"drop --quantize, or train --method {users}",
        )
    if config.factors and config.init_adapter:
        raise BadInputError("--factors and --init-adapter both give the start", hint="pass one of them")
    start = "--factors" if config.factors else "--init-adapter" if config.init_adapter else None
    if method.needs_factors and start is None:
        raise BadInputError(
            f"--method {method.name} trains between the factors of lorasb decompose",
            hint="pass --factors, or --init-adapter RUN/ to go on from a trained adapter",
        )
    if not method.needs_factors and start is not None:
        users = ", ".join(m.name for m in methods.factors_methods())
        raise BadInputError(f"{start} is for --method {users}, not {method.name}", hint=f"drop {start}")
    if config.scheduler not in SCHEDULERS:
        raise BadInputError(
            f"unknown --scheduler '{config.scheduler}'", hint=did_you_mean(config.scheduler, SCHEDULERS)
        )
    tracking.report_to(config.report_to)
    return method, method.resolve_options(config.method_options)


def _starting_factors(config: TrainConfig) -> artifacts.FactorsFile:
    """What R starts from: the factors file, or with --init-adapter a trained adapter's B, R, A and head (laid out
    like factors, with its provenance: its template, labels and init carry over)."""
    if config.factors:
        return artifacts.load_factors(config.factors)
    saved = adapter.load_adapter(config.init_adapter)
    if saved.meta.method not in {m.name for m in methods.factors_methods()} or saved.module_tensors:
        raise IncompatibleArtifactError(
            f"--init-adapter continues a LoRA-SB adapter; this one was trained with --method {saved.meta.method}",
            path=str(saved.path),
            hint="pass the -o of a lorasb train run of --method lorasb",
        )
    return saved


def _load_factors_checked(config: TrainConfig, ref: models.ModelRef) -> artifacts.FactorsFile:
    """The starting factors, checked against the model's config before any weight is loaded."""
    factors, trust_remote_code = _starting_factors(config), config.trust_remote_code
    head = models.auto_head(models.HeadSpec.from_meta(factors.meta))
    shapes = models.linear_shapes_from_config(ref, trust_remote_code=trust_remote_code, head=head)
    factors.check_fits(shapes, f"model '{ref.id}'", hint="pass the model the update was estimated on")
    base = factors.meta.base_model
    if models.fingerprint({m: shapes[m] for m in factors.factors}) != base.fingerprint:
        raise IncompatibleArtifactError(
            "factors come from a model with other target modules",
            path=str(factors.path),
            hint="pass the model the update was estimated on",
        )
    what = "the adapter --init-adapter names" if config.init_adapter else "the factors"
    models.check_base(base, ref, what=what, path=str(factors.path), force=config.force_base)
    return factors


# Options a resumed run may change: where things are (another machine), how often it saves and scores.
_FREE_ON_RESUME = {
    "logging_steps",
    "report_to",
    "model",
    "data",
    "factors",
    "init_adapter",
    "eval_data",
    "save_steps",
    "eval_steps",
    "eval_task",
    "device",
    "trust_remote_code",
    "allow_pickle",
    "force_template",
    "force_base",
    "strategy",  # checkpoints hold whole tensors: a run resumes under ddp, fsdp or one process alike
}


def _resume_point(config: TrainConfig, inputs: _Inputs) -> Path:
    """The newest checkpoint of the run that verifies (each newer one is named with why it was skipped), checked
    against this command's options and data."""
    found = newest_verified_checkpoint(inputs.out)
    if found.checkpoint is None:
        if not found.skipped:
            raise BadInputError(
                "--resume: the run has no checkpoint to resume from",
                path=str(inputs.out),
                hint="start the run again with --overwrite",
            )
        (newest, why), older = found.skipped[0], len(found.skipped) - 1
        raise BadInputError(
            f"--resume: no checkpoint of the run verifies: {newest}: {why}"
            + (f" (and {older} older {'one fails' if older == 1 else 'ones fail'} too)" if older else ""),
            path=str(inputs.out),
            hint="start the run again with --overwrite, or copy a whole run folder here",
        )
    for name, why in found.skipped:
        log.warning("--resume skips %s: %s", name, why)
    if not found.verified:
        log.warning(
            "--resume: %s was saved by an older lorasb, whose marker lists no sizes and hashes: "
            "its files are there but unverified",
            found.checkpoint.name,
        )
    _check_same_run(found.checkpoint, config, inputs, finished=False)
    log.info("resuming from %s", found.checkpoint)
    return found.checkpoint


def _check_same_run(folder: Path, config: TrainConfig, inputs: _Inputs, *, finished: bool) -> None:
    """Refuse a --resume whose options (other than where things are) or data differ from the run's, as recorded in
    `folder`'s adapter_config.json (a checkpoint's, or the finished run's)."""
    try:
        recorded = metadata.adapter_config(json.loads((folder / adapter.CONFIG_FILE).read_text()))
    except (OSError, ValueError, IncompatibleArtifactError):  # ValueError: not JSON, or not UTF-8
        recorded = None
    if recorded is None:
        raise BadInputError(
            f"--resume: the run's {adapter.CONFIG_FILE} is unreadable",
            path=str(folder / adapter.CONFIG_FILE),
            hint="start the run again with --overwrite",
        )
    hint = (
        "the run finished: to train its adapter further, start a new run with --init-adapter " + str(inputs.out)
        if finished
        else "resume with the run's options, or start a new run with --overwrite or another -o"
    )
    before, now = recorded.train or {}, _recorded_options(config, inputs.options)
    changed = [k for k, v in now.items() if k not in _FREE_ON_RESUME and k in before and before[k] != v]
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {before[k]} → {now[k]}" for k in changed)
        raise BadInputError(
            f"--resume continues the run with its own options; this command changes {shown}",
            path=str(inputs.out),
            hint=hint,
        )
    if recorded.data is not None and recorded.data.digest not in (None, inputs.train_set.digest):
        raise BadInputError("--resume: the training data differs from the run's", path=str(inputs.out), hint=hint)


def _recorded_options(config: TrainConfig, method_options: methods.MethodOptions) -> dict:
    """The options recorded in the adapter (and compared on resume): all but where the run writes, the method's
    own with the values it resolved."""
    own = {k: v for k, v in asdict(config).items() if k not in ("out", "resume", "overwrite", "method_options")}
    return own | asdict(method_options)


def _train_and_write(
    config: TrainConfig,
    inputs: _Inputs,
    resume_from: Path | None,
    progress: Callable[[int, int], None] | None,
    callbacks: Sequence[object],
    log_step: Callable[[StepStats], None] | None,
) -> TrainSummary:
    device, dtype = models.placement(config.device, config.dtype)
    if config.strategy == "fsdp":
        system.init_distributed()  # the group the Trainer then joins, formed before fsdp loads onto the CPU
    # A new classifier head is drawn with the seed: the same head `estimate --seed` computed G through.
    model, tokenizer = models.load_model(
        inputs.ref,
        device=fsdp.load_device(config.strategy, device),
        dtype=dtype,
        quantize=config.quantize,
        trust_remote_code=config.trust_remote_code,
        allow_pickle=config.allow_pickle,
        labels=inputs.labels,
        seed=config.seed,
    )
    examples = _examples(config, inputs, tokenizer)
    run = _prepare_method(config, inputs, model, tokenizer, examples, device)
    sharded = _shard(config, model, run, device)
    resumed = checkpoint_record(resume_from) if resume_from else {}
    if resume_from:  # the run's step-0 losses were measured when it started, before the checkpoint
        run = replace(run, step0_base=resumed.get("step0_base_loss"), step0_init=resumed.get("step0_init_loss"))
    clock = _Clock(before=resumed.get("seconds", 0.0))
    if config.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad-requiring input
    adapter_config = _adapter_config(config, inputs, model, run)
    if config.lr == "auto":  # the recorded options keep `auto`; the rate picked is recorded beside them
        lr = lr_range.auto_lr(
            run.prepared, examples, config.batch_size, tokenizer.pad_token_id, device, inputs.work, resume_from
        )
        adapter_config = replace(adapter_config, lr_auto=lr)
        config = replace(config, lr=lr)
    guards = [DivergenceGuard(inputs.work), StepLog(progress, log_step, clock.seconds), *callbacks]
    # The trackers' integrations read where to write when the Trainer makes them and when training starts.
    with tracking.logs_in(inputs.work, tracking.report_to(config.report_to)):
        trainer, task_eval, stop = _make_trainer(
            config, inputs, run, examples, tokenizer, adapter_config, device, guards, sharded=sharded
        )
        trainer.run_record = lambda: {
            "step0_base_loss": run.step0_base,
            "step0_init_loss": run.step0_init,
            "seconds": clock.seconds(),
        }
        clock.start()
        try:
            with files.storage_errors(inputs.work):
                train_loss_mean = _fit(trainer, resume_from)
        except BadInputError:
            _remove_incomplete_checkpoints(inputs.work)  # e.g. one a full disk cut off: never resumable
            raise
    seconds = clock.seconds()
    if stop is not None and stop.signal is not None:
        name = signal.Signals(stop.signal).name
        raise Interrupted(
            f"{name} at step {trainer.state.global_step}: the run is saved in checkpoint-{trainer.state.global_step}",
            signum=stop.signal,
            path=str(inputs.work),
            hint="to continue it, run the same command with --resume",
        )
    final_eval = _final_eval_loss(run.prepared, examples, config.batch_size, tokenizer.pad_token_id, device)
    return _write_run(
        inputs,
        run,
        trainer,
        adapter_config,
        seconds=seconds,
        final_eval=final_eval,
        device=device,
        train_loss_mean=train_loss_mean,
        task_results=task_eval.results if task_eval else [],
    )


@dataclass
class _Examples:
    """Training and eval examples (tokenized as the data loader reads them); the probe the step-0 losses are
    measured on (the eval rows when there are any, as the final eval loss); and the training slice held out for a
    method that chooses by loss (`--init-scale auto`), else None."""

    train: Sequence[data.Example]
    eval: Sequence[data.Example] | None
    probe: list[data.Example]
    probe_kind: str
    held_out: list[data.Example] | None = None


def _examples(config: TrainConfig, inputs: _Inputs, tokenizer) -> _Examples:
    # Rows are tokenized as the data loader reads them: a large corpus is never one list of examples.
    encoder = data.Encoder(
        inputs.fmt, tokenizer, config.max_length, inputs.labels, inputs.template, inputs.system_prompt
    )
    train_examples = data.LazyExamples(inputs.train_set.rows, encoder)
    eval_examples = data.LazyExamples(inputs.eval_set.rows, encoder) if inputs.eval_set else None
    held_out = None
    if inputs.options.holds_out_probe or config.lr == "auto":
        # E.g. `--init-scale auto` picks the scale, `--lr auto` the rate, on one slice held out of the training set:
        # never on data training sees, nor on the eval data, which may be the test split the run is scored on.
        held = max(1, min(32, len(train_examples) // 10))
        train_examples, held_out = train_examples[:-held], list(train_examples[-held:])
    first = list(train_examples[:64])  # every row of a small set, and the probe when there is no other
    tokens = sum(data.supervised_tokens(example) for example in first)
    data.check_supervised(tokens, f"the first {len(first)} training rows", config.max_length)
    if eval_examples:
        probe, kind = eval_examples, "eval"
    elif held_out is not None:
        probe, kind = held_out, "held-out training"
    else:
        probe, kind = first, "training"
    return _Examples(train_examples, eval_examples, list(probe), kind, held_out)  # the probe is encoded once


@dataclass
class _PreparedMethod:
    """The method set up on the model: what trains, its size, and the step-0 losses."""

    prepared: methods.Prepared
    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    rank: int | None
    trainable: int
    base_params: int
    lora_params: int
    step0_base: float | None
    step0_init: float | None


def _prepare_method(
    config: TrainConfig, inputs: _Inputs, model: nn.Module, tokenizer, examples: _Examples, device: torch.device
) -> _PreparedMethod:
    method, factors = inputs.method, inputs.factors
    if factors is not None:
        modules, rank = list(factors.factors), factors.meta.rank
        ranks = {m: lora_R.shape[0] for m, (_, lora_R, _) in factors.factors.items()}  # per module with --budget
    else:
        low_rank = method.uses_rank
        modules = models.resolve_targets(model, inputs.options.targets) if low_rank else []
        rank = inputs.options.rank if low_rank else None
        if low_rank:
            linalg.check_rank(rank, models.target_shapes(model, modules))
        ranks = {m: rank or 0 for m in modules}
    shapes = models.target_shapes(model, modules)
    base_params = models.parameter_count(model)
    lora_params = sum(ranks[module] * (m + n) for module, (m, n) in shapes.items())

    @torch.no_grad()
    def probe_loss(m: nn.Module, rows: Sequence[data.Example] = examples.probe) -> float:
        return loss.mean_loss(m, rows, config.batch_size, tokenizer.pad_token_id)

    step0_base = None if config.resume else probe_loss(model)
    setup = methods.Setup(
        model=model,
        modules=modules,
        rank=rank,
        seed=config.seed,
        options=inputs.options,
        factors=factors,
        # A method chooses on the held-out slice, never on the rows the run is scored on.
        probe_loss=lambda m: probe_loss(m, examples.held_out or examples.probe),
        batches=lambda n: data.make_batches(examples.train[:n], config.batch_size, tokenizer.pad_token_id),
        resumes=config.resume,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        prepared = method.prepare(setup)
    if config.quantize:
        quantization.mark_adapters_attached(prepared.model)
    trainable = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
    log.info(
        "--method %s: trainable parameters %s (%.4f%% of the base model's %s)%s",
        method.name,
        f"{trainable:,}",
        100 * trainable / base_params,
        f"{base_params:,}",
        f"; LoRA at {'rank ' + str(rank) if len(set(ranks.values())) == 1 else 'the same ranks'} on the same "
        f"targets: {lora_params:,}, {lora_params / trainable:.1f}× more"
        if lora_params and trainable
        else "",
    )
    step0_init = None if config.resume else _step0_init_loss(method, prepared, probe_loss, examples, step0_base, device)
    return _PreparedMethod(prepared, modules, shapes, rank, trainable, base_params, lora_params, step0_base, step0_init)


def _step0_init_loss(
    method: methods.Method,
    prepared: methods.Prepared,
    probe_loss: Callable[[nn.Module], float],
    examples: _Examples,
    step0_base: float,
    device: torch.device,
) -> float:
    """The initialized model's probe loss, with a warning when it is worse than the base's."""
    # Upcast master weights run their forward in the base dtype, as training will: base and init compare alike.
    with prepared.autocast(device):
        step0_init = probe_loss(prepared.model)
    log.info(
        "step-0 loss on %d %s samples: base %.4f, initialized %.4f",
        len(examples.probe),
        examples.probe_kind,
        step0_base,
        step0_init,
    )
    if step0_init > step0_base * (1 + 1e-4):
        log.warning(
            "the initialized model is worse than the base (%.4f > %.4f)%s",
            step0_init,
            step0_base,
            f": {method.worse_init_hint}" if method.worse_init_hint else "",
        )
    return step0_init


def _adapter_config(
    config: TrainConfig, inputs: _Inputs, model: nn.Module, run: _PreparedMethod
) -> metadata.AdapterMeta:
    """The adapter's metadata (adapter_config.json), also written into every checkpoint."""
    labels, start = inputs.labels, inputs.factors
    adapter_config = metadata.AdapterMeta.from_run(
        start.meta if start is not None else None,
        # where R started: the adapter's own run, so a chain of runs can be traced back
        continues=str(start.path.resolve()) if config.init_adapter else None,
        settings=run.prepared.config,
        base_model=inputs.ref.provenance(models.fingerprint(run.shapes), config.quantize),
        targets=getattr(inputs.options, "targets", None),
        target_modules=tuple(run.modules),
        rank=run.rank,
        method=inputs.method.name,
        data=metadata.DataProvenance.from_dataset(
            inputs.train_set, format=inputs.fmt, template=inputs.template, system_prompt=inputs.system_prompt
        ),
        train=_recorded_options(config, inputs.options),
        **(models.head_meta(models.HeadSpec.from_model(model, labels)) if labels is not None else {}),
    )
    log.info(
        "method settings: %s",
        json.dumps({k: v for k, v in run.prepared.config.items() if not isinstance(v, list)}),  # not curves
    )
    return adapter_config


def _shard(config: TrainConfig, model: nn.Module, run: _PreparedMethod, device: torch.device) -> bool:
    """--strategy fsdp under a launcher: shard the base now that the method is set up on it (its init read the
    whole weights), the trained tensors left whole on every rank (lorasb_cli/fsdp.py). Whether it sharded."""
    if not fsdp.sharding(config.strategy):
        return False
    trained = [p for p in run.prepared.model.parameters() if p.requires_grad]
    if 2 * run.trainable > run.base_params:
        log.warning(
            "--strategy fsdp: %s of the base's %s parameters train and stay whole on every rank; fsdp saves little "
            "over ddp here",
            f"{run.trainable:,}",
            f"{run.base_params:,}",
        )
    fsdp.shard_base(model, device, keep_whole=trained)
    return True


@dataclass
class _Clock:
    """Training seconds of a whole run: those its resumed checkpoint recorded, plus this process's since start()."""

    before: float = 0.0
    started: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return self.before + (time.perf_counter() - self.started if self.started is not None else 0.0)


def _make_trainer(
    config: TrainConfig,
    inputs: _Inputs,
    run: _PreparedMethod,
    examples: _Examples,
    tokenizer,
    adapter_config: metadata.AdapterMeta,
    device: torch.device,
    callbacks: list,
    *,
    sharded: bool,
) -> tuple[AdapterTrainer, TaskEval | None, StopOnSignal | None]:
    """The AdapterTrainer of the run (of a model `sharded` by --strategy fsdp or not), with its callbacks:
    (trainer, the --eval-task scorer or None, the signal handler or None)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .tasks import get_task

    prepared = run.prepared
    args = _training_arguments(config, inputs, prepared, evaluates=examples.eval is not None, device=device)
    trainer = AdapterTrainer(
        model=prepared.model,
        args=args,
        train_dataset=examples.train,
        eval_dataset=examples.eval,
        data_collator=lambda batch: data.collate(batch, tokenizer.pad_token_id),
        callbacks=callbacks,
        # A method's own optimizer (LoRA-Pro); the Trainer still builds the --scheduler around it.
        optimizers=(prepared.optimizer(args) if prepared.optimizer else None, None),
        adapter_config=adapter_config,
        export=prepared.export,
        sharded=sharded,
    )
    task_eval = None
    if config.eval_task:
        task_eval = TaskEval(
            get_task(config.eval_task),
            inputs.eval_set.rows,
            tokenizer,
            template=inputs.template,
            system_prompt=inputs.system_prompt,
            batch_size=config.batch_size,
            eval_steps=config.eval_steps,
            max_length=config.max_length,
        )
        trainer.add_callback(task_eval)
    for noisy in (PrinterCallback, ProgressCallback):  # they print to stdout; we report on stderr
        trainer.remove_callback(noisy)
    if args.report_to:  # after the trackers' own callbacks, which start them
        record = artifacts.recorded_fields(adapter_config)  # what the adapter's metadata will say
        trainer.add_callback(RecordRun(args.report_to, record, trainer.callback_handler.callbacks))
    # Under a launcher the launcher owns signals: one rank stopping alone would leave the others waiting.
    stop = StopOnSignal() if system.launcher_rank()[1] == 1 else None
    if stop is not None:
        trainer.add_callback(stop)
    return trainer, task_eval, stop


def _training_arguments(
    config: TrainConfig, inputs: _Inputs, prepared: methods.Prepared, *, evaluates: bool, device: torch.device
):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(inputs.work),
        run_name=str(inputs.out),  # what a tracker names the run: its -o, also while --overwrite writes beside it
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.scheduler,
        # transformers 5 reads a value below 1 as a fraction of the steps (get_warmup_steps); --warmup-ratio is < 1
        warmup_steps=config.warmup_ratio,
        logging_steps=config.logging_steps,
        # A language model's loss divides its token sum by the tokens of every rank, and the Trainer multiplies it by
        # the world size so that the ranks' gradient mean is the global token mean. A head's loss is a batch mean
        # already: that multiplication would scale its loss and gradients by the number of processes.
        average_tokens_across_devices=inputs.labels is None,
        save_strategy="steps",
        save_steps=config.save_steps,
        eval_strategy="steps" if evaluates and config.eval_steps else "no",
        eval_steps=config.eval_steps,
        seed=config.seed,
        activation_checkpointing=config.gradient_checkpointing,
        use_cpu=device.type == "cpu",
        # Float32 master weights of a bf16/fp16 base (full fine-tuning) train under autocast in the base dtype.
        bf16=prepared.mixed_precision == torch.bfloat16,
        fp16=prepared.mixed_precision == torch.float16,
        report_to=tracking.report_to(config.report_to),
        remove_unused_columns=False,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        optim="adamw_torch",
    )


def _fit(trainer, resume_from: Path | None) -> float | None:
    """Train (from `resume_from`), returning the mean training loss. A checkpoint of the run's last step is
    the trained run: its tensors and state are loaded, and nothing is trained (the Trainer, resumed at its last
    step in the middle of an epoch, would take one step more)."""
    from transformers.trainer_callback import TrainerState

    state_file = resume_from / "trainer_state.json" if resume_from else None
    saved = TrainerState.load_from_json(str(state_file)) if state_file else None
    if saved is None or not 0 < saved.max_steps <= saved.global_step:
        return trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None).training_loss
    log.info("%s holds the run's last step (%d): the run is written from it", resume_from, saved.global_step)
    trainer.state = saved
    trainer._load_from_checkpoint(str(resume_from))
    losses = [h["loss"] for h in saved.log_history if "loss" in h]
    return sum(losses) / len(losses) if losses else None


def _remove_incomplete_checkpoints(out: Path) -> None:
    for folder in out.glob("checkpoint-*"):
        if folder.is_dir() and not (folder / COMPLETE_FILE).is_file():
            shutil.rmtree(folder, ignore_errors=True)


@torch.no_grad()
def _final_eval_loss(
    prepared: methods.Prepared, examples: _Examples, batch_size: int, pad_id: int, device: torch.device
) -> float | None:
    """The trained model's loss on the eval rows, defined as the step-0 losses are (the mean over samples of each
    sample's mean token loss), so the three compare alike; None without eval data."""
    if not examples.eval:
        return None
    model = prepared.model
    training = model.training
    model.eval()  # no dropout, as at step 0 (a loaded model starts in eval mode)
    with prepared.autocast(device):
        value = loss.mean_loss(model, examples.eval, batch_size, pad_id)
    model.train(training)
    return value


def _write_run(
    inputs: _Inputs,
    run: _PreparedMethod,
    trainer,
    adapter_config: metadata.AdapterMeta,
    *,
    seconds: float,
    final_eval: float | None,
    device: torch.device,
    train_loss_mean: float | None,
    task_results: list[dict],
) -> TrainSummary:
    """The run directory's adapter, metrics.json and loss.png (global rank 0 only), and the summary."""
    out = inputs.work
    # One writer per job (docs/design.md §3): after DDP's all-reduced steps every rank holds the same trained tensors,
    # and global rank 0 writes them (as the Trainer's checkpoints: `should_save`).
    writer = system.is_main_process()
    if writer:
        adapter.save_adapter(out, run.prepared.export(), adapter_config)
    history = trainer.state.log_history
    steps = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")} for h in history if "loss" in h]
    evals = [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in history if "eval_loss" in h]
    tokens_per_second = trainer.state.num_input_tokens_seen / seconds if seconds > 0 else 0.0
    summary = TrainSummary(
        path=inputs.out,
        steps=trainer.state.global_step,
        trainable_params=run.trainable,
        base_params=run.base_params,
        lora_params_same_rank=run.lora_params,
        step0_base_loss=run.step0_base,
        step0_init_loss=run.step0_init,
        final_train_loss=steps[-1]["loss"] if steps else None,
        final_eval_loss=final_eval,
        seconds=seconds,
        tokens_per_second=tokens_per_second,
        peak_memory_bytes=system.peak_memory_bytes(device),
    )
    metrics = {
        **asdict(summary),
        "path": str(inputs.out),
        "method": inputs.method.name,
        "train_loss_mean": train_loss_mean,
        "loss": steps,
        "eval": evals,
        "task": task_results,
    }
    if writer:
        with files.atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        plot_losses(steps, evals, out / "loss.png", title=f"lorasb train --method {inputs.method.name}")
    return summary


def plot_losses(steps: list[dict], evals: list[dict], path: Path, title: str = "lorasb train") -> None:
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
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    files.write_figure(fig, path)
