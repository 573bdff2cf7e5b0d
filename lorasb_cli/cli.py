"""The `lorasb` command: one click group, thin commands that parse options, call a stage function, report.

stdout carries only the path a stage wrote (or JSON with --json), except `generate`'s, whose output is its
completions; logs, tables and progress go to stderr.
Exit status: 0 success, 2 bad usage or input, 1 failure while running.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from . import __version__, configs
from .errors import BadInputError, LorasbError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


# Commands whose processes form one job under a launcher (torchrun, accelerate launch): they join its process group.
# Every other command runs on global rank 0 alone and the other ranks return at once, so that a job writes each
# file and prints its stdout line once (docs/design.md §3). `run` holds every process: its estimate and train are
# data-parallel, its other stages run on rank 0 (lorasb_cli/pipeline.py).
DATA_PARALLEL = ("estimate", "train", "run")


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
        result = command(*args, as_json=as_json, quiet=quiet, **kwargs)
        system.leave_distributed()
        return result

    return wrapper


def _read_config(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    """--config FILE.yaml: the recipe's values for this command become its defaults (ctx.default_map), read before
    any other option, so that click converts and range-checks them as flags and a flag given wins."""
    if path is not None:
        from . import recipe

        ctx.default_map = recipe.options_for(recipe.load(path), path, ctx.command.name, recipe_options(ctx))


class RecipeCommand(click.Command):
    """A command that takes `--config FILE.yaml` (lorasb_cli/recipe.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["--config"],
                metavar="FILE.yaml",
                is_eager=True,
                expose_value=False,
                callback=_read_config,
                help="Options from a recipe: its top-level keys, then its section named after this command; "
                "flags given here win.",
            )
        )

    def recipe_options(self, ctx: click.Context):
        """What a recipe may set for this command (recipe.Options): every option but --config, --help and the
        common --json/--quiet/--debug, which say how a command talks, not what it does."""
        from .recipe import Options

        skip = {"config", "help", "as_json", "quiet", "debug"}
        return Options({p.name: p for p in self.get_params(ctx) if p.name not in skip})


def recipe_options(ctx: click.Context) -> dict:
    """{command name: recipe.Options} for every command a recipe may configure (`lorasb run` reads the recipe)."""
    group = ctx.find_root().command
    return {
        name: command.recipe_options(ctx)
        for name, command in group.commands.items()
        if isinstance(command, RecipeCommand)
    }


class ConfigCommand(RecipeCommand):
    """A command whose options are generated from a stage's config class (lorasb_cli/configs.py) and, where the
    config takes a plug-in's options, from every plug-in of that kind. They are made when the command first
    parses or shows help, so `lorasb --help` imports no plug-in implementation (only the declarations it lists);
    configs and plug-in declarations import no torch, so neither does a command's --help or usage error. The callback gets the filled config as `config`, and the
    options the command declares itself (--json, estimate's --dry-run) as they are."""

    def __init__(self, *args, config: type, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_class = config
        self.own = {p.name for p in self.params}
        self._generated = False

    def get_params(self, ctx):
        if not self._generated:
            from .options import cli_fields, click_param, plugin_fields_of

            cls = self.config_class
            plugins = plugin_fields_of(cls)
            self.params[:0] = [click_param(f) for f in cli_fields(cls)] + [click_param(f, plugin=True) for f in plugins]
            self._generated = True
        return super().get_params(ctx)

    def invoke(self, ctx):
        from .options import build

        values = {k: v for k, v in ctx.params.items() if k not in self.own}
        ctx.params = {k: v for k, v in ctx.params.items() if k in self.own} | {
            "config": build(self.config_class, values)
        }
        return super().invoke(ctx)

    def recipe_options(self, ctx: click.Context):
        """As RecipeCommand's, with the options a recipe's top level does not reach: the config class's
        `RECIPE_SECTION_ONLY` and every plug-in's options (a method's --rank is not decompose's)."""
        from dataclasses import replace

        from .options import cli_fields, plugin_fields_of

        declared = {f.name for f in cli_fields(self.config_class)}
        plugin = {f.name for f in plugin_fields_of(self.config_class)} - declared
        section_only = frozenset(getattr(self.config_class, "RECIPE_SECTION_ONLY", ())) | plugin
        return replace(super().recipe_options(ctx), section_only=section_only)

    def config_from(self, parent: click.Context, values: dict):
        """The config this command builds from `values` as a recipe gives them (`recipe.options_for`): the defaults
        of an empty command line, so click converts, range-checks and requires them exactly as flags."""
        from .options import build

        with self.make_context(self.name, [], parent=parent, default_map=values) as ctx:
            return build(self.config_class, {k: v for k, v in ctx.params.items() if k not in self.own})


def report(path, summary: dict, as_json: bool) -> None:
    """The only stdout output of a stage: its path, or a JSON summary with the path; printed by global rank 0 only,
    so that `$(torchrun ... -m lorasb_cli estimate ...)` is one path.

    `path` is the output as the user gave it: stages return their -o unresolved, so a relative -o prints relative
    (and a default output its default name), an absolute one absolute, whatever the stage."""
    from .system import is_main_process

    if not is_main_process():
        return
    if as_json:
        click.echo(json.dumps({"path": str(path), **summary}, default=str))
    else:
        click.echo(str(path))


class PluginGroup(click.Group):
    """The `lorasb` group: every command takes --config, and its help ends with the plug-ins each stage can run,
    read from their registrations and summaries (declarations only: no torch, no plug-in implementation)."""

    command_class = RecipeCommand

    def format_epilog(self, ctx, formatter):
        from . import inits, methods

        for title, registry in (
            ("Inits (decompose --init)", inits.INITS),
            ("Methods (train --method)", methods.METHODS),
        ):
            with formatter.section(title):
                formatter.write_dl(registry.summaries())
        super().format_epilog(ctx, formatter)


@click.group(cls=PluginGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="lorasb")
def cli():
    """LoRA-SB fine-tuning in composable stages: estimate → decompose → train → merge → evaluate.

    \b
    Each stage reads and writes safetensors artifacts, so stages chain in shell pipelines:
      lorasb decompose "$(lorasb estimate -m mistral -d data.jsonl -o update.safetensors)" --rank 32
    """


@cli.command(
    cls=ConfigCommand,
    config=configs.EstimateConfig,
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb estimate --model smollm2-135m --data arithmetic --samples 32 -o update.safetensors
  lorasb estimate --model mistral --data meta-math/MetaMathQA --frac 0.001 -o update.safetensors
  lorasb estimate -m ./model -d data.jsonl --samples 64 --raw --shard 0/2 -o part0.safetensors
  lorasb estimate --model mistral --dry-run --batch-size 8 --max-length 512 --rank 96 --dtype bfloat16
  lorasb estimate -m ./llama-3-70b --dry-run --device cuda --world-size 8 --strategy fsdp --json

\b
Several processes (G is all-reduced; rank 0 writes the file and prints its path):
  torchrun --nproc-per-node 8 -m lorasb_cli estimate -m mistral -d data.jsonl --samples 64 -o update.safetensors
  accelerate launch --num_processes 8 -m lorasb_cli estimate -m mistral -d data.jsonl --samples 64 -o update.safetensors""",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the memory estimate, train and merge need on each device (GPU and host) of a job of --world-size "
    "processes under --strategy, with --quantize (from config.json; no weights, no data read).",
)
@common_options
def estimate(config, dry_run, as_json, quiet):
    """Estimate the LoRA-SB update ΔW = −η·sign(G), G the summed gradient over a small sample of the data."""
    from .console import (
        STABILITY_COLUMNS,
        STABILITY_TITLE,
        human_bytes,
        print_summary,
        print_table,
        progress_bar,
        stability_rows,
    )
    from .estimate import estimate as run_estimate
    from .models import resolve_device
    from .system import peak_memory_label

    if dry_run:
        from .system import is_main_process

        if is_main_process():  # one plan per job under a launcher
            _print_plan(config, config.rank, as_json)
        return
    if config.data is None:
        raise click.UsageError("Missing option '--data' / '-d' (only --dry-run runs without data).")
    with progress_bar("estimate", enabled=not quiet) as progress:
        summary = run_estimate(config, progress)
    planned = ", ".join(f"{human_bytes(b)} on {w}" for w, b in (summary.planned_bytes or {}).items()) or "-"
    print_summary(
        "estimate",
        [
            ("modules", summary.modules),
            ("samples", f"{summary.samples} ({summary.sampling})"),
            ("tokens", summary.tokens),
            ("seconds", f"{summary.seconds:.1f}"),
            (peak_memory_label(resolve_device(config.device)), human_bytes(summary.peak_memory_bytes)),
            ("planned peak (lorasb's memory plan)", planned),
            ("accumulators", f"{summary.accumulate_dtype} on {summary.accumulate_on}"),
        ],
    )
    if summary.stability:
        print_table(STABILITY_TITLE, STABILITY_COLUMNS, stability_rows(summary.stability))
    if summary.samples_auto:
        auto = summary.samples_auto
        print_table(
            f"--samples auto: {auto['samples']} samples ({'reached' if auto['reached'] else 'below'} overlap "
            f"{auto['threshold']:g} at r = {auto['rank']})",
            ["samples", "overlap with the previous estimate"],
            [[p["samples"], "-" if p["overlap"] is None else f"{p['overlap']:.3f}"] for p in auto["curve"]],
        )
    report(summary.path, {k: v for k, v in vars(summary).items() if k != "path"}, as_json)


def _print_plan(config, rank: int, as_json: bool) -> None:
    """estimate --dry-run: the memory each stage needs on each device of the job, from the model's config alone."""
    from . import plan
    from .console import human_bytes, print_table
    from .system import launcher_rank

    head = "sequence-classification" if config.format in ("classification", "regression") else "causal-lm"
    layout = plan.Layout(world_size=config.world_size or launcher_rank()[1], strategy=config.strategy)
    planned = plan.plan_model(
        config.model,
        targets=config.targets,
        batch_size=config.batch_size,
        max_length=config.max_length,
        rank=rank,
        dtype=config.dtype,
        device=config.device,
        accumulate_on=config.accumulate_on,
        accumulate_dtype=config.accumulate_dtype,
        quantize=config.quantize,
        layout=layout,
        head=head,
        trust_remote_code=config.trust_remote_code,
    )
    facts = planned.facts
    totals = [
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
    ]
    quantized = f" ({facts.quantize} linear layers)" if facts.quantize else ""
    print_table(
        f"memory plan per device of {layout.describe()}: {facts.model}, {facts.dtype}{quantized}, batch "
        f"{config.batch_size} × {facts.max_length}, rank {rank}, {len(facts.targets)} targets "
        f"({facts.target_entries:,} weight entries)",
        ["stage", "holds", "on", "size"],
        [
            [name, item.what, item.where, human_bytes(item.bytes)]
            for name, stage in planned.stages.items()
            for item in stage.items
        ]
        + totals,
    )
    if as_json:
        click.echo(json.dumps(planned.to_json()))
    else:
        per_device = planned.per_device()
        click.echo(
            "; ".join(
                f"{name} {stage.total / 2**30:.2f} GiB (gpu {per_device[name]['gpu'] / 2**30:.2f}, host "
                f"{per_device[name]['host'] / 2**30:.2f})"
                for name, stage in planned.stages.items()
            )
        )


@cli.command(
    cls=ConfigCommand,
    config=configs.CombineConfig,
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb combine part0.safetensors part1.safetensors -o update.safetensors""",
)
@common_options
def combine(config, as_json, quiet):
    """Sum raw update shards (estimate --raw --shard i/N) and take the sign: the single-process update."""
    from .console import progress_bar
    from .estimate import combine as run_combine

    with progress_bar("combine", enabled=not quiet) as progress:
        path = run_combine(config, progress)
    report(path, {"shards": len(config.parts)}, as_json)


@cli.command(
    cls=ConfigCommand,
    config=configs.DecomposeConfig,
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  lorasb decompose update.safetensors --rank 96 -o factors.safetensors
  lorasb decompose update.safetensors --rank 32 --init noisy --noise-std 1 -o noisy.safetensors
  lorasb decompose update.safetensors --rank 32 --budget-ratio 1 -o budgeted.safetensors
  lorasb decompose --init lora-xs --model mistral --rank 32 -o lora-xs.safetensors""",
)
@common_options
def decompose(config, as_json, quiet):
    """Factor the update (or, for --init lora-xs, the model's weights) into frozen B, A and the trainable r×r R."""
    from .console import print_table, progress_bar
    from .decompose import decompose as run_decompose

    with progress_bar("decompose", enabled=not quiet) as progress:
        summary = run_decompose(config, progress)
    spent = sum(r * r for r in summary.ranks.values())
    print_table(
        f"captured energy Σσ²(top r) / Σσ²; Σ r² = {spent:,} trainable",
        ["modules", "count", "r", "mean", "min", "max"],
        [[kind, n, r, f"{mean:.3f}", f"{lo:.3f}", f"{hi:.3f}"] for kind, n, r, mean, lo, hi in summary.by_kind()],
    )
    report(summary.path, {"rank": summary.rank, "ranks": summary.ranks, "energy": summary.energy}, as_json)


@cli.command(
    cls=ConfigCommand,
    config=configs.TrainConfig,
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  lorasb train --model smollm2-135m --factors factors.safetensors --data arithmetic --max-steps 60 -o run/
  lorasb train --model mistral --factors factors.safetensors --data meta-math/MetaMathQA --lr 1e-3 -o run/
  lorasb train --model mistral --factors factors.safetensors --data meta-math/MetaMathQA -o run/ --resume
  lorasb train --method lora --rank 8 --model mistral --data meta-math/MetaMathQA --lr 2e-4 -o lora-run/
  lorasb train ... -o run/ --report-to tensorboard --logging-steps 5   (then: tensorboard --logdir run/logs)

\b
Several processes (DDP: --batch-size per process; rank 0 writes the run):
  torchrun --nproc-per-node 8 -m lorasb_cli train -m mistral -f factors.safetensors -d data.jsonl -o run/
  accelerate launch --multi_gpu --num_processes 8 -m lorasb_cli train -m mistral -f factors.safetensors -d data.jsonl -o run/
A base sharded across them (FSDP2; the same with accelerate launch --use_fsdp --fsdp_version 2):
  torchrun --nproc-per-node 8 -m lorasb_cli train -m mistral -f factors.safetensors -d data.jsonl --strategy fsdp -o run/""",
)
@common_options
def train(config, as_json, quiet):
    """Train only the r×r matrices R (B and A frozen), or another --method, and write the adapter directory."""
    from .console import human_bytes, print_summary, train_progress
    from .models import resolve_device
    from .system import peak_memory_label
    from .train import train as run_train

    with train_progress(enabled=not quiet) as (progress, log_step):
        summary = run_train(config, progress, log_step=log_step)
    loss = lambda value: "-" if value is None else f"{value:.4f}"
    print_summary(
        "train",
        [
            ("steps", summary.steps),
            ("trainable parameters", f"{summary.trainable_params:,}"),
            ("step-0 loss, base", loss(summary.step0_base_loss)),
            ("step-0 loss, initialized", loss(summary.step0_init_loss)),
            ("final train loss", loss(summary.final_train_loss)),
            ("final eval loss", loss(summary.final_eval_loss)),
            ("tokens/s", f"{summary.tokens_per_second:.0f}"),
            (peak_memory_label(resolve_device(config.device)), human_bytes(summary.peak_memory_bytes)),
        ],
    )
    report(summary.path, {k: v for k, v in vars(summary).items() if k != "path"}, as_json)


@cli.command(
    cls=ConfigCommand,
    config=configs.CompareConfig,
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  lorasb compare --model smollm2-135m --data arithmetic --task gsm8k --methods lorasb,lora-xs,lora:8,full \\
    --ranks 16,32 --seeds 3 --max-steps 100 --lr lorasb=2e-3,lora-xs=2e-3,lora=2e-4,full=2e-5 -o report/
  (rerun the same command after an interruption: finished cells are kept)""",
)
@common_options
def compare(config, as_json, quiet):
    """Run methods × ranks × seeds on the same data, steps and evaluation; write results.md/json and PNGs."""
    from .compare import compare as run_compare
    from .console import progress_bar

    with progress_bar("compare", enabled=not quiet) as progress:
        summary = run_compare(config, progress)
    report(summary.path, {"cells": summary.cells, "rows": summary.rows}, as_json)


@cli.command(
    cls=ConfigCommand,
    config=configs.MergeConfig,
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb merge --model mistral --adapter run/ -o mistral-math/
  lorasb merge --adapter run/ --format peft -o mistral-math-lora/""",
)
@common_options
def merge(config, as_json, quiet):
    """Fold W0 + s·B·R·A into a checkpoint that from_pretrained loads, or export a standard PEFT LoRA adapter."""
    from .console import progress_bar
    from .merge import merge as run_merge

    with progress_bar("merge", enabled=not quiet) as progress:
        path = run_merge(config, progress)
    report(path, {"format": config.format}, as_json)


@cli.command(
    cls=ConfigCommand,
    config=configs.EvaluateConfig,
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb evaluate --model mistral-math/ --task gsm8k -o results.json
  lorasb evaluate --model mistral --adapter run/ --task gsm8k --data gsm8k_test.jsonl --limit 200 -o results.json""",
)
@common_options
def evaluate(config, as_json, quiet):
    """Score a model (or model + adapter) on a task; write results JSON and per-example predictions JSONL."""
    from .console import print_table, progress_bar
    from .evaluate import evaluate as run_evaluate

    with progress_bar("evaluate", enabled=not quiet) as progress:
        summary = run_evaluate(config, progress)
    scalars = {k: v for k, v in summary.metrics.items() if isinstance(v, (int, float))}
    print_table(
        f"{config.task} ({summary.count} examples)",
        ["metric", "value"],
        [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in scalars.items()],
    )
    report(
        summary.path, {"count": summary.count, "metrics": summary.metrics, "predictions": summary.predictions}, as_json
    )


@cli.command(
    cls=ConfigCommand,
    config=configs.GenerateConfig,
    context_settings=CONTEXT,
    epilog="""\b
Examples:
  lorasb generate -m smollm2-135m --adapter run/ --prompt "What is 12 plus 30?"
  lorasb generate -m merged/ --task gsm8k --file questions.jsonl --json > answers.jsonl
  printf 'What is 2 plus 2?\\nWhat is 3 times 4?\\n' | lorasb generate -m smollm2-135m --template-of run/
  lorasb generate -m smollm2-135m --template chat -p "Tell a joke." --temperature 0.8 --top-p 0.95 --seed 1

\b
stdout carries only the completions, one per prompt (streamed as they are generated when stdout is a
terminal); --json: one {"prompt": ..., "completion": ...} line per prompt. The template and its source go
to stderr, as evaluate prints them.""",
)
@common_options
def generate(config, as_json, quiet):
    """Answer prompts with a model, model + adapter or merged model, prompted exactly as evaluate prompts them."""
    from .generate import generate as run_generate
    from .generate import read_prompts

    prompts = read_prompts(config, sys.stdin)  # before any model loads: a bad input costs nothing
    stream = sys.stdout if sys.stdout.isatty() and not as_json else None
    for done in run_generate(config, prompts, stream):
        if as_json:
            click.echo(json.dumps({"prompt": done.prompt, "completion": done.completion}))
        else:
            click.echo("" if stream is not None else done.completion)  # a streamed completion is written already


@cli.command(
    name="run",
    cls=click.Command,  # the recipe is its argument, not a --config
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb run examples/recipes/quickstart.yaml
  lorasb run recipe.yaml --stages train,merge,evaluate -o out2/
  torchrun --nproc-per-node 2 -m lorasb_cli run recipe.yaml   (estimate and train data-parallel)
  (rerun after a change or an interruption: stages whose outputs are up to date are skipped)""",
)
@click.argument("recipe_file", metavar="RECIPE.yaml")
@click.option("-o", "--out", default=None, help="Folder of every output [default: the recipe's out:].")
@click.option(
    "--stages", default=None, help="Comma list of stages to run [default: the recipe's stages:, else all five]."
)
@common_options
def run(recipe_file, out, stages, as_json, quiet):
    """Run estimate → decompose → train → merge → evaluate from one recipe into one folder, skipping up-to-date stages.

    \b
    The recipe's top-level keys are options of every stage that has them, a section per stage (train: ...) adds
    or overrides; the folder (out:) receives update.safetensors, factors.safetensors, run/, merged/, results.json
    and run.json, the record of what each stage ran with."""
    from . import pipeline
    from .console import progress_bar

    out, configs = stage_configs(click.get_current_context(), recipe_file, out=out, stages=stages)
    runs = pipeline.run(out, configs, lambda stage: progress_bar(stage, enabled=not quiet))
    report(out, {"stages": {r.stage: {"path": str(r.path), "skipped": r.skipped} for r in runs}}, as_json)


def stage_configs(ctx: click.Context, recipe_file: str, *, out: str | None = None, stages: str | None = None):
    """(the run's folder, {stage: config}) of a recipe: each stage's options as `--config` gives them, with the
    inputs and outputs the chain wires (pipeline.wired); every stage's options are checked before any runs."""
    from pathlib import Path

    from . import pipeline, recipe

    document = recipe.load(recipe_file)
    commands = recipe_options(ctx)
    recipe.check(document, recipe_file, commands)
    out = out or document.get("out")
    if not out:
        raise BadInputError("the recipe names no output folder", path=recipe_file, hint="add out: DIR or pass -o DIR")
    out = Path(str(out)).expanduser()
    configs = {}
    for stage in pipeline.parse_stages(stages or document.get("stages")):
        chain = pipeline.wired(stage, out)
        clash = sorted(set(document.get(stage) or {}) & set(chain))
        if clash:
            raise BadInputError(
                f"'{clash[0]}' in section '{stage}:': lorasb run sets it ({chain[clash[0]]})",
                path=recipe_file,
                hint=f"drop it; the chain's outputs are named in out: ({', '.join(pipeline.OUTPUTS.values())})",
            )
        values = recipe.options_for(document, recipe_file, stage, commands) | chain
        configs[stage] = cli.commands[stage].config_from(ctx, values)
    return out, configs


@cli.command(
    name="inspect",
    cls=ConfigCommand,
    config=configs.InspectConfig,
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb inspect factors.safetensors
  lorasb inspect run/ --json
  lorasb inspect --verify merged/
  lorasb inspect update.safetensors --plot spectrum.png""",
)
@common_options
def inspect_command(config, as_json, quiet):
    """Show what a lorasb artifact is: kind, provenance, modules, shapes, rank and parameter counts."""
    from .console import print_description
    from .inspect import describe, plot_update
    from .inspect import verify as verify_tensors

    path = config.path
    if config.plot:
        click.echo(plot_update(path, config.plot))
        return

    if config.verify:
        result = verify_tensors(path)  # a mismatch raises: one error line naming the file and tensor, exit 2
        if result["status"] == "no hashes recorded":  # what cannot be verified did not pass verification
            raise BadInputError(
                f"no hashes recorded: its {result['tensors']} tensors cannot be verified",
                path=result["path"],
                hint="re-create it with the lorasb stage that wrote it",
            )
        if as_json:
            click.echo(json.dumps(result))
        elif result["status"] == "ok":
            click.echo(f"verified: all {result['tensors']} tensors match their recorded hashes ({result['path']})")
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
    cls=ConfigCommand,
    config=configs.DataSetConfig,
    context_settings=CONTEXT,
    epilog="""\b
Example:
  lorasb data list
  lorasb data gsm-symbolic --split test --size 200 --seed 0 -o gsm-test.jsonl""",
)
@common_options
def data_command(config, as_json, quiet):
    """Write a built-in offline data set as JSONL: exactly the rows `--data NAME` feeds a stage."""
    from . import builtin_data
    from .console import print_rows
    from .files import atomic_path, check_output

    if config.name == "list":
        sets = builtin_data.describe()
        if as_json:
            click.echo(json.dumps(sets, indent=2))
        else:
            print_rows("built-in data sets", sets, ["name", "description", "fields", "splits", "source", "available"])
        return
    out = config.out or f"{config.name}-{config.split}.jsonl"
    check_output(out, {})
    dataset = builtin_data.load(config.name, split=config.split, size=config.size, seed=config.seed)
    with atomic_path(out) as tmp:
        tmp.write_text(builtin_data.to_jsonl(dataset.rows))
    report(out, {"rows": len(dataset.rows), **dataset.provenance()}, as_json)


@cli.command(name="models", context_settings=CONTEXT)
@common_options
def models_command(as_json, quiet):
    """List the model aliases, what each is, whether it is available offline here and the folder it loads from."""
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache

    from . import bundled
    from .console import print_rows
    from .models import ALIASES, HUB_MODELS

    rows = []
    for m in bundled.BUNDLED.values():
        source = bundled.source_path(m)
        folder = bundled.local_directory(m, source)[0] if source else None
        offline = "yes" if folder is not None and folder.is_dir() else "yes (converted into path on first use)"
        rows.append(
            {
                "alias": m.alias,
                "what": m.description,
                "source": f"{m.package}=={m.version}",
                "offline": offline if folder is not None else f"no: {m.pip_line}",
                "path": None if folder is None else str(folder),
            }
        )
    for alias, hub_id in ALIASES.items():
        what, download = HUB_MODELS[hub_id]
        cached = try_to_load_from_cache(hub_id, "config.json")  # a path in the HF cache's snapshot, or not a str
        rows.append(
            {
                "alias": alias,
                "what": what,
                "source": f"hub: {hub_id}",
                "offline": "yes (in the HF cache)"
                if isinstance(cached, str)
                else f"no: first use downloads {download}",
                "path": str(Path(cached).parent) if isinstance(cached, str) else None,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        print_rows("models", rows, ["alias", "what", "source", "offline", "path"])


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
