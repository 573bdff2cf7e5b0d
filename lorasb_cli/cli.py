"""The `lorasb` command: one click group, thin commands that parse options, call a stage function, report.

stdout carries only the path a stage wrote (or JSON with --json); logs, tables and progress go to stderr.
Exit status: 0 success, 2 bad usage or input, 1 failure while running.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from . import __version__
from .errors import LorasbError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


# Commands whose processes form one job under a launcher (torchrun, accelerate launch): they join its process group.
# Every other command runs on global rank 0 alone and the other ranks return at once, so that a job writes each
# file and prints its stdout line once (DESIGN.md §3).
DATA_PARALLEL = ("estimate", "train")


def common_options(command):
    """--json, --quiet and --debug on every command, and its place in a launcher's job."""

    @click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout instead of the path.")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bars, tables or info logs on stderr.")
    @click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
    @functools.wraps(command)
    def wrapper(*args, as_json: bool, quiet: bool, debug: bool, **kwargs):
        from . import system
        from .console import setup_logging
        from .errors import BadInputError

        rank, world = system.launcher_rank()
        setup_logging(debug=debug, quiet=quiet, rank=rank)
        if world > 1 and command.__name__ not in DATA_PARALLEL:
            if command.__name__ == "compare":  # its cells would join the job's process group from rank 0 alone
                raise BadInputError(
                    "lorasb compare runs its cells one process each, not under a launcher",
                    hint="run it without torchrun / accelerate launch",
                )
            if rank > 0:
                return None
        return command(*args, as_json=as_json, quiet=quiet, **kwargs)

    return wrapper


def model_options(command):
    for decorator in reversed(
        (
            click.option("--model", "-m", required=True, help="Local HF directory, hub id, or alias (e.g. mistral)."),
            click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16."),
            click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
            click.option("--trust-remote-code", is_flag=True, help="Allow the model repo's own Python code."),
            click.option(
                "--allow-pickle",
                is_flag=True,
                help="Load .bin/.pt weights (torch.load, weights_only) when a model has no safetensors.",
            ),
        )
    ):
        command = decorator(command)
    return command


def data_options(command):
    for decorator in reversed(
        (
            click.option("--data", "-d", required=True, help="Local .jsonl/.json/.csv/.parquet file or hub data set."),
            click.option("--split", default="train", show_default=True, help="Split of a hub or built-in data set."),
            click.option("--data-config", default=None, help="Configuration of a hub data set (e.g. main, sst2)."),
            click.option("--fields", default=None, help="Columns named otherwise: prompt=COL,response=COL,label=COL."),
            click.option("--size", default=None, type=int, help="Rows of a built-in data set (lorasb data list)."),
            click.option(
                "--format",
                "data_format",
                default="auto",
                show_default=True,
                help="text, prompt-response, classification, regression, or auto (picked from the fields).",
            ),
            template_option,
            click.option("--batch-size", default=8, show_default=True, type=int, help="Samples per forward pass."),
            click.option("--max-length", default=512, show_default=True, type=int, help="Tokens per sample, at most."),
        )
    ):
        command = decorator(command)
    return command


template_option = click.option(
    "--template",
    default="auto",
    show_default=True,
    help="Prompt template of prompt-response rows: plain, alpaca, chat, or auto (prompt/completion: plain; "
    "messages: chat; instruction styles: alpaca).",
)
force_template_option = click.option(
    "--force-template", is_flag=True, help="Use --template even where the factors or adapter used another."
)


def _number(option: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number", param_hint=option) from None


def report(path, summary: dict, as_json: bool) -> None:
    """The only stdout output of a stage: its path, or a JSON summary with the path; printed by global rank 0 only,
    so that `$(torchrun ... -m lorasb_cli estimate ...)` is one path."""
    from .system import is_main_process

    if not is_main_process():
        return
    if as_json:
        click.echo(json.dumps({"path": str(path), **summary}, default=str))
    else:
        click.echo(str(path))


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="lorasb")
def cli():
    """LoRA-SB fine-tuning in composable stages: estimate → decompose → train → merge → evaluate.

    \b
    Each stage reads and writes safetensors artifacts, so stages chain in shell pipelines:
      lorasb decompose "$(lorasb estimate -m mistral -d data.jsonl -o update.safetensors)" --rank 32
    """


def _data_optional(command):
    """estimate's --data: needed by every run but --dry-run, so the command checks it rather than click."""
    for param in command.__click_params__:
        if param.name == "data":
            param.required = False
    return command


@cli.command(
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb estimate --model mistral --data metamathqa.jsonl --frac 0.001 -o update.safetensors
  lorasb estimate -m ./model -d data.jsonl --samples 64 --raw --shard 0/2 -o part0.safetensors
  lorasb estimate --model mistral --dry-run --batch-size 8 --max-length 512 --rank 96 --dtype bfloat16""",
)
@_data_optional
@model_options
@data_options
@click.option("--frac", type=float, default=None, help="Fraction of the split to sample [default: 0.001].")
@click.option("--samples", type=int, default=None, help="Number of samples instead of --frac.")
@click.option(
    "--targets", default="all-linear", show_default=True, help="all-linear, attention, or suffixes q_proj,v_proj."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sample draw.")
@click.option("--eta", default=1e-5, show_default=True, type=float, help="Size η of the simulated first step.")
@click.option("--raw", is_flag=True, help="Write float32 sums of G and the sample count (for lorasb combine).")
@click.option("--shard", default=None, help="i/N: take the i-th (from 0) of N disjoint parts of the sample.")
@click.option(
    "--accumulate-on",
    type=click.Choice(["auto", "cpu", "device"]),
    default="auto",
    show_default=True,
    help="Where G's accumulators live (4 bytes per target weight entry in float32); auto: the device "
    "when everything fits there, else the CPU.",
)
@click.option(
    "--accumulate-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="bfloat16 halves the accumulators; each batch rounds once into G.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the memory estimate, train and merge need (from config.json; no weights, no data read).",
)
@click.option("--rank", "-r", default=32, show_default=True, type=int, help="--dry-run: the rank train is planned at.")
@click.option("-o", "--out", default="update.safetensors", show_default=True, help="Update file to write.")
@common_options
def estimate(
    model,
    dtype,
    device,
    trust_remote_code,
    allow_pickle,
    data,
    split,
    data_config,
    fields,
    size,
    data_format,
    template,
    batch_size,
    max_length,
    frac,
    samples,
    targets,
    seed,
    eta,
    raw,
    shard,
    accumulate_on,
    accumulate_dtype,
    dry_run,
    rank,
    out,
    as_json,
    quiet,
):
    """Estimate the LoRA-SB update ΔW = −η·sign(G), G the summed gradient over a small sample of the data."""
    from .console import human_bytes, print_table, progress_bar
    from .estimate import EstimateConfig
    from .estimate import estimate as run_estimate

    if dry_run:
        from . import plan
        from .system import is_main_process

        if not is_main_process():  # one plan per job under a launcher
            return
        head = "sequence-classification" if data_format in ("classification", "regression") else "causal-lm"
        planned = plan.plan_model(
            model,
            targets=targets,
            batch_size=batch_size,
            max_length=max_length,
            rank=rank,
            dtype=dtype,
            device=device,
            accumulate_on=accumulate_on,
            accumulate_dtype=accumulate_dtype,
            head=head,
            trust_remote_code=trust_remote_code,
        )
        facts = planned.facts
        print_table(
            f"memory plan: {facts.model}, {facts.dtype}, batch {batch_size} × {max_length}, rank {rank}, "
            f"{len(facts.targets)} targets ({facts.target_entries:,} weight entries)",
            ["stage", "holds", "on", "size"],
            [
                [name, item.what, item.where, human_bytes(item.bytes)]
                for name, stage in planned.stages.items()
                for item in stage.items
            ]
            + [
                [
                    name,
                    "total" + {True: "", False: " — does NOT fit", None: ""}[planned.fits(name)],
                    ", ".join(
                        f"{w} (free {human_bytes(planned.free[w]) if w in planned.free else 'unknown here'})"
                        for w in stage.need()
                    ),
                    human_bytes(stage.total),
                ]
                for name, stage in planned.stages.items()
            ],
        )
        if as_json:
            click.echo(json.dumps(planned.to_json()))
        else:
            click.echo("; ".join(f"{name} {stage.total / 2**30:.2f} GiB" for name, stage in planned.stages.items()))
        return
    if data is None:
        raise click.UsageError("Missing option '--data' / '-d' (only --dry-run runs without data).")
    config = EstimateConfig(
        model=model,
        allow_pickle=allow_pickle,
        data=data,
        out=out,
        split=split,
        data_config=data_config,
        fields=fields,
        size=size,
        format=data_format,
        template=template,
        frac=frac if frac is not None or samples is not None else 0.001,
        samples=samples,
        targets=targets,
        batch_size=batch_size,
        max_length=max_length,
        dtype=dtype,
        device=device,
        seed=seed,
        eta=eta,
        raw=raw,
        shard=shard,
        trust_remote_code=trust_remote_code,
        accumulate_on=accumulate_on,
        accumulate_dtype=accumulate_dtype,
    )
    with progress_bar("estimate", enabled=not quiet) as progress:
        summary = run_estimate(config, progress)
    planned = ", ".join(f"{human_bytes(b)} on {w}" for w, b in (summary.planned_bytes or {}).items()) or "-"
    print_table(
        "estimate",
        ["modules", "samples", "tokens", "seconds", "peak memory", "planned", "accumulators"],
        [
            [
                summary.modules,
                summary.samples,
                summary.tokens,
                f"{summary.seconds:.1f}",
                human_bytes(summary.peak_memory_bytes),
                planned,
                f"{summary.accumulate_dtype} on {summary.accumulate_on}",
            ]
        ],
    )
    report(summary.path, {k: v for k, v in vars(summary).items() if k != "path"}, as_json)


@cli.command(
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb combine part0.safetensors part1.safetensors -o update.safetensors""",
)
@click.argument("parts", nargs=-1, required=True)
@click.option("-o", "--out", default="update.safetensors", show_default=True, help="Update file to write.")
@common_options
def combine(parts, out, as_json, quiet):
    """Sum raw update shards (estimate --raw --shard i/N) and take the sign: the single-process update."""
    from .estimate import combine as run_combine

    path = run_combine(list(parts), out)
    report(path, {"shards": len(parts)}, as_json)


@cli.command(
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  lorasb decompose update.safetensors --rank 96 -o factors.safetensors
  lorasb decompose update.safetensors --rank 32 --init noisy --noise-std 1 -o noisy.safetensors
  lorasb decompose --init lora-xs --model mistral --rank 32 -o lora-xs.safetensors""",
)
@click.argument("update", required=False)
@click.option("--rank", "-r", required=True, type=int, help="Rank r of B (m×r), R (r×r), A (r×n).")
@click.option(
    "--init",
    "init",
    default="lorasb",
    show_default=True,
    metavar="NAME",
    help="lorasb, lora-xs (SVD of W0), kaiming, noisy, non-orthonormal.",
)
@click.option("--model", "-m", default=None, help="--init lora-xs: the model whose weights W0 are factored.")
@click.option("--targets", default="all-linear", show_default=True, help="--init lora-xs without an update: modules.")
@click.option("--noise-std", type=float, default=None, help="--init noisy: σ of the noise, in units of η.")
@click.option("--niter", default=None, type=int, help="Power iterations of the randomized SVD [default: 4].")
@click.option("--exact", is_flag=True, help="Full SVD instead of torch.svd_lowrank (slower).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the randomized SVD and random inits.")
@click.option("--device", default="auto", show_default=True, help="Where to run the SVDs: auto, cpu, cuda.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own code from the hub (--init lora-xs).")
@click.option("-o", "--out", default="factors.safetensors", show_default=True, help="Factors file to write.")
@common_options
def decompose(
    update, rank, init, model, targets, noise_std, niter, exact, seed, device, trust_remote_code, out, as_json, quiet
):
    """Factor the update (or, for --init lora-xs, the model's weights) into frozen B, A and the trainable r×r R."""
    from .console import print_table, progress_bar
    from .decompose import decompose as run_decompose
    from .linalg import DEFAULT_NITER

    with progress_bar("decompose", enabled=not quiet) as progress:
        summary = run_decompose(
            update,
            rank,
            out,
            init=init,
            model=model,
            targets=targets,
            noise_std=noise_std,
            niter=DEFAULT_NITER if niter is None else niter,
            exact=exact,
            seed=seed,
            device=device,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    print_table(
        f"captured energy Σσ²(top {rank}) / Σσ²",
        ["modules", "count", "mean", "min", "max"],
        [[kind, n, f"{mean:.3f}", f"{lo:.3f}", f"{hi:.3f}"] for kind, n, mean, lo, hi in summary.energy_by_kind()],
    )
    report(summary.path, {"rank": rank, "energy": summary.energy}, as_json)


@cli.command(
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  lorasb train --model mistral --factors factors.safetensors --data metamathqa.jsonl --lr 1e-3 -o run/
  lorasb train --model mistral --factors factors.safetensors --data metamathqa.jsonl -o run/ --resume
  lorasb train --method lora --rank 8 --model mistral --data metamathqa.jsonl --lr 2e-4 -o lora-run/""",
)
@model_options
@click.option(
    "--method",
    default="lorasb",
    show_default=True,
    metavar="NAME",
    help="lorasb, lora, rslora, dora, pissa, loraga, lora-pro, milora, inilora, inilora-alpha, inilora-beta, "
    "full, head.",
)
@click.option("--factors", "-f", default=None, help="--method lorasb: factors file written by lorasb decompose.")
@click.option("--rank", "-r", default=None, type=int, help="Rank of the other low-rank methods.")
@click.option(
    "--targets", default="all-linear", show_default=True, help="Other methods: all-linear, attention, or suffixes."
)
@click.option(
    "--alpha", default=None, type=float, help="LoRA α [default: the method's paper: 2r, or r for PiSSA/MiLoRA]."
)
@click.option(
    "--init-samples", default=32, show_default=True, type=int, help="--method loraga: samples of its gradient."
)
@click.option("--init-iters", default=1000, show_default=True, type=int, help="--method inilora*: fit iterations.")
@data_options
@force_template_option
@click.option("--eval-data", default=None, help="Held-out file for eval loss (same format as --data).")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="AdamW learning rate.")
@click.option("--epochs", default=1.0, show_default=True, type=float, help="Passes over --data.")
@click.option("--max-steps", default=-1, show_default=True, type=int, help="Optimizer steps; overrides --epochs.")
@click.option("--grad-accum", default=1, show_default=True, type=int, help="Batches per optimizer step.")
@click.option("--warmup-ratio", default=0.0, show_default=True, type=float, help="Fraction of steps to warm up.")
@click.option(
    "--scheduler", default="linear", show_default=True, help="linear, cosine, constant, constant_with_warmup."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of data order and any randomness.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward to save memory.")
@click.option("--save-steps", default=500, show_default=True, type=int, help="Checkpoint every N steps.")
@click.option("--eval-steps", default=None, type=int, help="Evaluate --eval-data every N steps (and at the end).")
@click.option("--eval-task", default=None, help="Also score --eval-data on this task (lorasb evaluate --task).")
@click.option(
    "--init-scale",
    default="1",
    show_default=True,
    help="Multiply R_init by this factor, or auto: the factor with the lowest held-out loss.",
)
@click.option("--resume", is_flag=True, help="Continue the run in -o from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty -o.")
@click.option("-o", "--out", required=True, help="Run directory to write the adapter into.")
@common_options
def train(
    model,
    dtype,
    device,
    trust_remote_code,
    allow_pickle,
    method,
    factors,
    rank,
    targets,
    alpha,
    init_samples,
    init_iters,
    data,
    split,
    data_config,
    fields,
    size,
    data_format,
    template,
    batch_size,
    max_length,
    force_template,
    eval_data,
    lr,
    epochs,
    max_steps,
    grad_accum,
    warmup_ratio,
    scheduler,
    seed,
    gradient_checkpointing,
    save_steps,
    eval_steps,
    eval_task,
    init_scale,
    resume,
    overwrite,
    out,
    as_json,
    quiet,
):
    """Train only the r×r matrices R (B and A frozen), or another --method, and write the adapter directory."""
    from .console import human_bytes, print_table, progress_bar
    from .train import TrainConfig
    from .train import train as run_train

    config = TrainConfig(
        model=model,
        allow_pickle=allow_pickle,
        factors=factors,
        method=method,
        rank=rank,
        targets=targets,
        alpha=alpha,
        init_samples=init_samples,
        init_iters=init_iters,
        data=data,
        out=out,
        split=split,
        data_config=data_config,
        fields=fields,
        size=size,
        format=data_format,
        template=template,
        force_template=force_template,
        eval_data=eval_data,
        lr=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        warmup_ratio=warmup_ratio,
        scheduler=scheduler,
        max_length=max_length,
        seed=seed,
        dtype=dtype,
        device=device,
        gradient_checkpointing=gradient_checkpointing,
        save_steps=save_steps,
        eval_steps=eval_steps,
        eval_task=eval_task,
        init_scale=init_scale if init_scale == "auto" else _number("--init-scale", init_scale),
        resume=resume,
        overwrite=overwrite,
        trust_remote_code=trust_remote_code,
    )
    with progress_bar("train", enabled=not quiet) as progress:
        summary = run_train(config, progress)
    loss = lambda value: "-" if value is None else f"{value:.4f}"
    print_table(
        "train",
        ["steps", "trainable", "step-0 base", "step-0 init", "final train", "final eval", "tokens/s", "peak memory"],
        [
            [
                summary.steps,
                f"{summary.trainable_params:,}",
                loss(summary.step0_base_loss),
                loss(summary.step0_init_loss),
                loss(summary.final_train_loss),
                loss(summary.final_eval_loss),
                f"{summary.tokens_per_second:.0f}",
                human_bytes(summary.peak_memory_bytes),
            ]
        ],
    )
    report(summary.path, {k: v for k, v in vars(summary).items() if k != "path"}, as_json)


@cli.command(
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  lorasb compare --model smollm2-135m --data arithmetic --task gsm8k --methods lorasb,lora-xs,lora:8,full \\
    --ranks 16,32 --seeds 3 --max-steps 100 --lr lorasb=2e-3,lora-xs=2e-3,lora=2e-4,full=2e-5 -o report/
  (rerun the same command after an interruption: finished cells are kept)""",
)
@click.option("--model", "-m", required=True, help="Local directory, hub id or alias (lorasb models).")
@click.option("--data", "-d", required=True, help="Training data: a file or a built-in name (lorasb data list).")
@click.option("--eval-data", default=None, help="Held-out data to score [default: the built-in's test split].")
@click.option("--task", "-t", required=True, help="Evaluation task (lorasb evaluate --task).")
@click.option(
    "--methods",
    required=True,
    help="Comma list of train methods and inits; NAME:R1/R2 sets one method's ranks, e.g. lora:8.",
)
@click.option("--ranks", default="", help="Comma list of ranks for methods without their own.")
@click.option("--seeds", default=3, show_default=True, type=int, help="Seeds 0..N-1 per cell.")
@click.option("--max-steps", default=100, show_default=True, type=int, help="Optimizer steps of every cell.")
@click.option("--lr", default="1e-3", show_default=True, help="Learning rate, or METHOD=LR,...,DEFAULT.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Training batch size.")
@click.option("--max-length", default=256, show_default=True, type=int, help="Truncate samples to this many tokens.")
@click.option("--targets", default="all-linear", show_default=True, help="all-linear, attention, or suffixes.")
@click.option("--samples", default=32, show_default=True, type=int, help="Samples of each seed's estimate.")
@click.option("--eta", default=1e-5, show_default=True, type=float, help="η of each seed's estimate.")
@click.option("--size", default=None, type=int, help="Rows of a built-in training set.")
@click.option("--eval-size", default=None, type=int, help="Rows of a built-in test set.")
@click.option("--max-new-tokens", default=None, type=int, help="Generation budget of the task [default: the task's].")
@template_option
@click.option("--metric", default=None, help="Metric the table ranks by, e.g. flexible_accuracy [default: the task's].")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repo's own Python code.")
@click.option("-o", "--out", required=True, help="Report directory (resumed if it holds finished cells).")
@common_options
def compare(
    model,
    data,
    eval_data,
    task,
    methods,
    ranks,
    seeds,
    max_steps,
    lr,
    batch_size,
    max_length,
    targets,
    samples,
    eta,
    size,
    eval_size,
    max_new_tokens,
    template,
    metric,
    trust_remote_code,
    out,
    as_json,
    quiet,
):
    """Run methods × ranks × seeds on the same data, steps and evaluation; write results.md/json and PNGs."""
    from pathlib import Path

    from . import compare as cmp
    from .console import progress_bar

    try:
        rank_list = [int(r) for r in ranks.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"--ranks '{ranks}' must be a comma list of integers") from None
    cells = cmp.grid(cmp.parse_methods(methods, rank_list), seeds, cmp.parse_lrs(lr))
    out_dir = Path(out)
    train_data, held_out = cmp.prepare_data(out_dir, data, eval_data, size, eval_size)
    settings = cmp.Settings(
        model=model,
        train_data=train_data,
        eval_data=held_out,
        task=task,
        max_steps=max_steps,
        batch_size=batch_size,
        max_length=max_length,
        targets=targets,
        samples=samples,
        eta=eta,
        max_new_tokens=max_new_tokens,
        template=template,
        metric=metric,
        trust_remote_code=trust_remote_code,
    )
    with progress_bar("compare", enabled=not quiet) as progress:
        results = cmp.run_grid(out_dir, settings, cells, progress)
    path = cmp.write_report(out_dir, settings, results)
    report(path, {"cells": len(results), "rows": cmp.aggregate(results, metric)}, as_json)


@cli.command(
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb merge --model mistral --adapter run/ -o mistral-math/
  lorasb merge --adapter run/ --format peft -o mistral-math-lora/""",
)
@click.option("--adapter", "-a", required=True, help="Adapter directory written by lorasb train.")
@click.option("--model", "-m", default=None, help="Base model [default: the one recorded in the adapter].")
@click.option(
    "--format",
    "out_format",
    default="hf",
    show_default=True,
    help="hf: merged checkpoint; peft: a PEFT LoRA adapter (lora_B = B·R).",
)
@click.option("--dtype", default=None, help="float32, bfloat16 or float16 [default: the base's].")
@click.option("--max-shard-size", default=None, help="Re-shard, e.g. 5GB [default: keep the base's shards].")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty -o.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model repo's own Python code.")
@click.option("-o", "--out", required=True, help="Output directory.")
@common_options
def merge(adapter, model, out_format, dtype, max_shard_size, overwrite, trust_remote_code, out, as_json, quiet):
    """Fold W0 + s·B·R·A into a checkpoint that from_pretrained loads, or export a standard PEFT LoRA adapter."""
    from .console import progress_bar
    from .merge import merge as run_merge

    with progress_bar("merge", enabled=not quiet) as progress:
        path = run_merge(
            adapter,
            out,
            model=model,
            format=out_format,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    report(path, {"format": out_format}, as_json)


@cli.command(
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb evaluate --model mistral-math/ --task gsm8k -o results.json
  lorasb evaluate --model mistral --adapter run/ --task gsm8k --data gsm8k_test.jsonl --limit 200 -o results.json""",
)
@model_options
@click.option("--adapter", "-a", default=None, help="Adapter directory (lorasb train -o) to evaluate unmerged.")
@click.option("--task", "-t", required=True, help="gsm8k, math, commonsense, glue-*, classification, perplexity.")
@click.option("--data", "-d", default=None, help="Local file or hub data set [default: the task's own].")
@click.option("--split", default=None, help="Split of a hub or built-in data set [default: the task's].")
@click.option("--data-config", default=None, help="Configuration of a hub data set [default: the task's].")
@click.option("--fields", default=None, help="The task's fields named otherwise: question=COL,answer=COL.")
@template_option
@force_template_option
@click.option("--size", default=None, type=int, help="Rows of a built-in data set (lorasb data list).")
@click.option("--limit", default=None, type=int, help="Evaluate the first N examples only.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Examples per batch.")
@click.option("--max-new-tokens", default=None, type=int, help="Generation length [default: the task's].")
@click.option("--max-length", default=1024, show_default=True, type=int, help="Input tokens, at most.")
@click.option("--scoring", default=None, help="generate or loglik (pick the most likely option) [default: the task's].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed (decoding is greedy).")
@click.option("-o", "--out", default="results.json", show_default=True, help="Results JSON; predictions go beside it.")
@common_options
def evaluate(
    model,
    dtype,
    device,
    trust_remote_code,
    allow_pickle,
    adapter,
    task,
    data,
    split,
    data_config,
    fields,
    template,
    force_template,
    size,
    limit,
    batch_size,
    max_new_tokens,
    max_length,
    scoring,
    seed,
    out,
    as_json,
    quiet,
):
    """Score a model (or model + adapter) on a task; write results JSON and per-example predictions JSONL."""
    from .console import print_table, progress_bar
    from .evaluate import EvaluateConfig
    from .evaluate import evaluate as run_evaluate

    config = EvaluateConfig(
        model=model,
        allow_pickle=allow_pickle,
        task=task,
        out=out,
        adapter=adapter,
        data=data,
        split=split,
        data_config=data_config,
        fields=fields,
        template=template,
        force_template=force_template,
        size=size,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        scoring=scoring,
        seed=seed,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    with progress_bar("evaluate", enabled=not quiet) as progress:
        summary = run_evaluate(config, progress)
    scalars = {k: v for k, v in summary.metrics.items() if isinstance(v, (int, float))}
    print_table(
        f"{task} ({summary.count} examples)",
        ["metric", "value"],
        [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in scalars.items()],
    )
    report(
        summary.path, {"count": summary.count, "metrics": summary.metrics, "predictions": summary.predictions}, as_json
    )


@cli.command(
    name="inspect",
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb inspect factors.safetensors
  lorasb inspect run/ --json
  lorasb inspect --verify merged/""",
)
@click.argument("path")
@click.option(
    "--verify", is_flag=True, help="Read every tensor and check it against the hash recorded when it was written."
)
@common_options
def inspect_command(path, verify, as_json, quiet):
    """Show what a lorasb artifact is: kind, provenance, modules, shapes, rank and parameter counts."""
    from .console import print_description
    from .inspect import describe
    from .inspect import verify as verify_tensors

    if verify:
        result = verify_tensors(path)  # a mismatch raises: one error line naming the file and tensor, exit 2
        if as_json:
            click.echo(json.dumps(result))
        elif result["status"] == "ok":
            click.echo(f"verified: all {result['tensors']} tensors match their recorded hashes ({result['path']})")
        elif result["status"] == "no hashes recorded":
            click.echo(
                f"no hashes recorded: {result['path']} was written before lorasb recorded them; "
                f"its {result['tensors']} tensors cannot be verified"
            )
        else:
            click.echo(
                f"verified {result['verified']} of {result['tensors']} tensors (all match); the others have "
                f"no recorded hash ({result['path']})"
            )
        return
    description = describe(path)
    if as_json:
        click.echo(json.dumps(description, indent=2, default=str))
    else:
        print_description(description)


@cli.command(
    name="data",
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb data list
  lorasb data gsm-symbolic --split test --size 200 --seed 0 -o gsm-test.jsonl""",
)
@click.argument("name")
@click.option("--split", default="train", show_default=True, help="train or test.")
@click.option("--size", default=None, type=int, help="Rows [default: the set's own size].")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of generation or subsetting.")
@click.option("-o", "--out", default=None, help="JSONL file to write [default: NAME-SPLIT.jsonl].")
@common_options
def data_command(name, split, size, seed, out, as_json, quiet):
    """Write a built-in offline data set as JSONL: exactly the rows `--data NAME` feeds a stage."""
    from . import builtin_data
    from .artifacts import atomic_path
    from .console import print_rows

    if name == "list":
        sets = builtin_data.describe()
        if as_json:
            click.echo(json.dumps(sets, indent=2))
        else:
            print_rows("built-in data sets", sets, ["name", "description", "fields", "splits", "source", "available"])
        return
    dataset = builtin_data.load(name, split=split, size=size, seed=seed)
    out = out or f"{name}-{split}.jsonl"
    with atomic_path(out) as tmp:
        tmp.write_text(builtin_data.to_jsonl(dataset.rows))
    report(out, {"rows": len(dataset.rows), **dataset.provenance()}, as_json)


@cli.command(name="models", context_settings=CONTEXT)
@common_options
def models_command(as_json, quiet):
    """List the model aliases, what each is, and whether it is available offline here."""
    from . import bundled
    from .console import print_rows
    from .models import ALIASES

    rows = [
        {
            "alias": m.alias,
            "what": m.description,
            "source": f"{m.package}=={m.version}",
            "offline": "yes" if bundled.source_path(m) else f"no: {m.pip_line}",
        }
        for m in bundled.BUNDLED.values()
    ] + [
        {"alias": alias, "what": "hub model", "source": hub_id, "offline": "if in the HF cache"}
        for alias, hub_id in ALIASES.items()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        print_rows("models", rows, ["alias", "what", "source", "offline"])


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group, turn every error into one stderr line and an exit status."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("LORASB_DEBUG") == "1"
    try:
        status = cli.main(args=args, prog_name="lorasb", standalone_mode=False)
    except LorasbError as e:
        if debug:
            raise
        _error(e.one_line())
        sys.exit(e.exit_status)
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            _error("interrupted (SIGINT)")
            sys.exit(130)
        _error("aborted")
        sys.exit(1)
    except click.ClickException as e:
        if debug:
            raise
        command = f"lorasb {e.ctx.info_name} --help" if getattr(e, "ctx", None) and e.ctx.parent else "lorasb --help"
        _error(f"{e.format_message()} (see '{command}')")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _error("interrupted (SIGINT)")
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        message = str(e).splitlines()[0] if str(e) else ""
        _error(f"{type(e).__name__}: {message} — rerun with --debug for the traceback")
        sys.exit(1)
    sys.exit(status or 0)


def _error(text: str) -> None:
    """The one stderr line of a failed command; `[rank N] Error: ...` on a launcher's ranks other than 0."""
    from .console import rank_prefix

    click.echo(f"{rank_prefix()}Error: {text}", err=True)
