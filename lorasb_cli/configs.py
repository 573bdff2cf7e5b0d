"""Each command's options as one frozen config dataclass (lorasb_cli/options.py fields), which the command fills
and its stage function takes.

This module imports no torch, transformers or peft, nor any module that does, so that `lorasb COMMAND --help` and
usage errors are instant: the CLI generates a command's options from these classes, and the plug-in options from
the declarations in lorasb_cli/methods and lorasb_cli/inits (also light; their implementations load on use),
which `plugin_fields` imports only then, so `lorasb --help` imports no plug-in. Each stage module re-exports its
config (`from lorasb_cli.train import TrainConfig`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import click

from .linalg import DEFAULT_NITER
from .options import (
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_OR_AUTO,
    SEED,
    DataOptions,
    Declared,
    ModelOptions,
    PluginConfig,
    Range,
    TemplateOptions,
    TrainingDataOptions,
    allow_unverified,
    argument,
    force_base,
    force_template,
    option,
    positive_or_auto,
    rank,
    redeclared,
    targets,
    trust_remote_code,
)
from .tasks import MAX_NEW_TOKENS
from .tracking import REPORT_TO

ACCUMULATE_ON = ("auto", "cpu", "device")  # estimate --accumulate-on; lorasb_cli/plan.py places each
QUANTIZE = ("nf4", "fp4", "int8")  # --quantize; lorasb_cli/quantization.py loads each
STRATEGIES = ("ddp", "fsdp")  # --strategy of estimate and train under a launcher
DEFAULT_FRAC = 0.001  # of the training split: the paper's ~0.1%


class _SamplesType(click.ParamType):
    """--samples: a positive count, or `auto`."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"'{value}' is neither a number of samples nor auto", param, ctx)


SAMPLES = _SamplesType()


@dataclass(frozen=True, kw_only=True)
class QuantizedModelOptions(ModelOptions):
    """The model group of the commands that run the base (estimate, train, evaluate, generate): it may be loaded
    quantized."""

    quantize: str | None = option(
        type=click.Choice(QUANTIZE),
        help="Hold the base's linear layers in 4 bits (nf4, fp4) or 8 bits (int8) with bitsandbytes, as QLoRA; "
        "trained tensors stay float32 and merge folds into the unquantized weights. Needs lorasb[quant].",
    )


@dataclass(frozen=True, kw_only=True)
class ParallelOptions(Declared):
    """How the processes of a launcher's job (torchrun, accelerate launch) share the model: estimate and train."""

    strategy: str = option(
        type=click.Choice(STRATEGIES),
        default="ddp",
        help="ddp: every process holds the whole base; fsdp: the base sharded per decoder layer across processes "
        "(FSDP2 fully_shard).",
    )


@dataclass(frozen=True, kw_only=True)
class EstimateConfig(TrainingDataOptions, ParallelOptions, QuantizedModelOptions):
    """`lorasb estimate`'s options (the model and data groups, then its own); `--frac` 0.001 unless `--samples`."""

    data: str | None = option("--data", "-d", help="Local .jsonl/.json/.csv/.parquet file or hub data set.")
    frac: float | None = option(type=float, range=FRACTION, help="Fraction of the split to sample [default: 0.001].")
    min_samples: int = option(
        default=32, range=AT_LEAST_1, help="--frac draws at least this many samples (or every row)."
    )
    samples: int | str | None = option(
        type=SAMPLES,
        help="Number of samples instead of --frac, or auto: draw until the estimate is stable at --rank (--threshold, "
        "--max-samples).",
    )
    targets: str = targets()
    seed: int = option(default=0, range=SEED, help="Seed of the sample draw.")
    # Above 1 a simulated step is no step; below 1e-20 float32 R_init underflows to 0.
    eta: float = option(default=1e-5, range=Range(1e-20, 1), help="Size η of the simulated first step.")
    raw: bool = option(
        flag=True, default=False, help="Write float32 sums of G and the sample count (for lorasb combine)."
    )
    shard: str | None = option(help="i/N: take the i-th (from 0) of N disjoint parts of the sample.")
    accumulate_on: str = option(
        type=click.Choice(ACCUMULATE_ON),
        default="auto",
        help="Where G's accumulators live (4 bytes per target weight entry in float32); auto: the device "
        "when everything fits there, else the CPU.",
    )
    accumulate_dtype: str = option(
        type=click.Choice(["float32", "bfloat16"]),
        default="float32",
        help="bfloat16 halves the accumulators; each batch rounds once into G.",
    )
    rank: int = rank(
        default=32, help="The rank decompose will use: --dry-run plans train at it, --samples auto checks it."
    )
    threshold: float = option(
        default=0.9,
        range=FRACTION,
        help="--samples auto: stop once two successive estimates' top-r subspaces overlap this much.",
    )
    max_samples: int = option(default=512, range=AT_LEAST_1, help="--samples auto: the most samples it draws.")
    report_ranks: str | None = option(
        metavar="RANKS",
        help="Report how stable the top-r subspaces are at these ranks (e.g. 32,64,96, or auto): the overlap of the "
        "sample's two halves, per module, in the update's metadata. Sums the halves apart: 2× accumulators.",
    )
    world_size: int | None = option(
        type=int,
        range=AT_LEAST_1,
        help="--dry-run: plan each device of a job of N processes [default: the launcher's, else 1].",
    )
    out: str = option("-o", "--out", default="update.safetensors", help="Update file to write.")

    def __post_init__(self):
        super().__post_init__()
        if self.frac is None and self.samples is None:
            object.__setattr__(self, "frac", DEFAULT_FRAC)


@dataclass(frozen=True, kw_only=True)
class CombineConfig(Declared):
    """`lorasb combine`'s options."""

    parts: tuple[str, ...] = argument(many=True)
    allow_unverified: bool = allow_unverified()
    out: str = option("-o", "--out", default="update.safetensors", help="Update file to write.")


def _init_help() -> str:
    """--init's help: the registered inits (read when the option is first made; `lorasb --help` has summaries)."""
    from . import inits

    return f"How B, R, A are made: {', '.join(inits.INITS)} (each described in lorasb --help)."


def _method_help() -> str:
    """--method's help: the registered methods."""
    from . import methods

    return f"What is trained: {', '.join(methods.METHODS)} (each described in lorasb --help)."


@dataclass(frozen=True, kw_only=True)
class DecomposeConfig(PluginConfig):
    """`lorasb decompose`'s options. The init's own options (--noise-std, ...) are declared by the init
    (lorasb_cli/inits) and arrive in `init_options` as given; `from_options` builds a config from flat options."""

    update: str | None = argument(required=False)
    rank: int | None = rank(
        help="Rank r of B (m×r), R (r×r), A (r×n); with --budget the reference rank [default there: the rank the "
        "budget affords everywhere, √(budget / modules)].",
    )
    init: str = option(default="lorasb", metavar="NAME", help=_init_help)
    model: str | None = option("--model", "-m", help="A weight-based init (lora-xs): the model whose W0 is factored.")
    targets: str = targets("A weight-based init without an update: the modules.")
    budget: int | None = option(
        type=int,
        range=AT_LEAST_1,
        help="Trainable parameters Σ r² to spend: a rank per module from its spectrum, greedy on captured energy "
        "per parameter (--rank is the reference).",
    )
    budget_ratio: float | None = option(
        type=float, range=POSITIVE, help="--budget as a fraction of the count at --rank everywhere."
    )
    min_rank: int = option(default=1, range=AT_LEAST_1, help="With a budget: the least rank of a module.")
    max_rank: int | None = option(
        type=int,
        range=AT_LEAST_1,
        help="With a budget: the largest rank of a module [default: 4 × --rank, at most min(m, n)].",
    )
    niter: int = option(default=DEFAULT_NITER, range=NON_NEGATIVE, help="Power iterations of the randomized SVD.")
    exact: bool = option(flag=True, default=False, help="Full SVD instead of torch.svd_lowrank (slower).")
    seed: int = option(default=0, range=SEED, help="Seed of the randomized SVD and random inits.")
    device: str = option(default="auto", help="Where to run the SVDs: auto, cpu, cuda.")
    trust_remote_code: bool = trust_remote_code("Allow the model's own code (weight-based inits).")
    allow_unverified: bool = allow_unverified()
    out: str = option("-o", "--out", default="factors.safetensors", help="Factors file to write.")
    init_options: Mapping[str, object] = field(default_factory=dict)

    PLUGIN_FIELD: ClassVar[str] = "init_options"
    # A recipe's top-level model and targets are what the chain trains; here they would ask for a weight-based init.
    RECIPE_SECTION_ONLY: ClassVar[frozenset[str]] = frozenset({"model", "targets"})

    @staticmethod
    def plugin_fields() -> list:
        from . import inits

        return inits.option_fields()


@dataclass(frozen=True, kw_only=True)
class TrainConfig(PluginConfig, TrainingDataOptions, ParallelOptions, QuantizedModelOptions):
    """`lorasb train`'s options: the model and data groups, then its own. The chosen method's options (--rank,
    --alpha, --init-scale, ...) are declared by the method (lorasb_cli/methods) and arrive in `method_options` as
    given; `TrainConfig.from_options(...)` builds a config from flat options, as the command line does."""

    method: str = option(default="lorasb", metavar="NAME", help=_method_help)
    factors: str | None = option("--factors", "-f", help="Factors file written by lorasb decompose (--method lorasb).")
    force_base: bool = force_base()
    allow_unverified: bool = allow_unverified()
    init_adapter: str | None = option(
        metavar="RUN",
        help="Instead of --factors: a trained LoRA-SB adapter (lorasb train -o) to start from, its B, A, trained R "
        "and head, with this run's own data and schedule.",
    )
    force_template: bool = force_template()
    eval_data: str | None = option(help="Held-out file for eval loss (same format as --data).")
    lr: float | str = option(
        default=1e-3,
        type=POSITIVE_OR_AUTO,
        help="AdamW learning rate, or auto: the pick of a range test on a slice held out of --data (lr_range.png).",
    )
    weight_decay: float = option(
        default=0.0,
        range=NON_NEGATIVE,
        help="AdamW's decoupled weight decay λ: each step p ← p − lr·λ·p (the Trainer's AdamW skips biases and norms).",
    )
    epochs: float = option(default=1.0, range=POSITIVE, help="Passes over --data.")
    max_steps: int = option(default=-1, range=Range(-1), help="Optimizer steps; overrides --epochs (-1: none).")
    grad_accum: int = option(default=1, range=AT_LEAST_1, help="Batches per optimizer step.")
    warmup_ratio: float = option(default=0.0, range=Range(0, 1, open_high=True), help="Fraction of steps to warm up.")
    scheduler: str = option(default="linear", help="linear, cosine, constant, constant_with_warmup.")
    seed: int = option(default=0, range=SEED, help="Seed of data order and any randomness.")
    gradient_checkpointing: bool = option(
        flag=True, default=False, help="Recompute activations in backward to save memory."
    )
    save_steps: int = option(default=500, range=AT_LEAST_1, help="Checkpoint every N steps.")
    logging_steps: int = option(
        default=10,
        range=AT_LEAST_1,
        help="Log the mean loss, lr and grad-norm every N steps and at the last (metrics.json, --report-to; a "
        "line on stderr when it is not a terminal).",
    )
    report_to: str = option(
        type=click.Choice(REPORT_TO),
        default="none",
        help="Also log to this tracker, under -o/logs/ unless its own environment variables say otherwise; all: "
        "each one installed. Install with pip install 'lorasb[tracking]' (tensorboard), wandb or mlflow.",
    )
    eval_steps: int | None = option(
        type=int, range=AT_LEAST_1, help="Evaluate --eval-data every N steps (and at the end)."
    )
    eval_task: str | None = option(help="Also score --eval-data on this task (lorasb evaluate --task).")
    resume: bool = option(flag=True, default=False, help="Continue the run in -o from its last checkpoint.")
    overwrite: bool = option(flag=True, default=False, help="Replace a non-empty -o.")
    out: str = option("-o", "--out", required=True, help="Run directory to write the adapter into.")
    method_options: Mapping[str, object] = field(default_factory=dict)

    PLUGIN_FIELD: ClassVar[str] = "method_options"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "lr", positive_or_auto(self.lr, "--lr"))

    @staticmethod
    def plugin_fields() -> list:
        from . import methods

        return methods.option_fields()


COMPARE_MAX_LENGTH = 256  # compare --max-length when not given: every cell of a grid trains and scores at this budget


@dataclass(frozen=True, kw_only=True)
class GridSettings(TrainingDataOptions, ModelOptions):
    """What every cell of a compare grid shares: the model and data groups, which each cell's stages get whole
    (`options.group_values`), the held-out data, the task, and the estimate and training budget."""

    data: str = redeclared(
        DataOptions, "data", help="Training data: a file, hub data set or built-in name (lorasb data list)."
    )
    eval_data: str | None = option(help="Held-out data to score [default: the built-in's test split].")
    task: str = option("--task", "-t", required=True, help="Evaluation task (lorasb evaluate --task).")
    max_steps: int = option(default=100, range=AT_LEAST_1, help="Optimizer steps of every cell.")
    max_length: int | None = redeclared(
        DataOptions, "max_length", show_default=f"{COMPARE_MAX_LENGTH}, or the model's position limit if smaller"
    )
    targets: str = targets("all-linear, attention, or suffixes.")
    samples: int = option(default=32, range=AT_LEAST_1, help="Samples of each seed's estimate.")
    eta: float = option(default=1e-5, range=Range(1e-20, 1), help="η of each seed's estimate.")
    max_new_tokens: int | None = option(
        type=int, range=AT_LEAST_1, help="Generation budget of the task [default: the task's]."
    )
    metric: str | None = option(help="Metric the table ranks by, e.g. flexible_accuracy [default: the task's].")
    score_steps: str | None = option(
        help="Also score every cell at these earlier steps (comma list, e.g. 40,150): the checkpoint its run saves "
        "there, by the task and by the response loss; results.md gets the learning curve, curve.png its plot."
    )
    # Not options: every cell trains and scores with these.
    warmup_ratio: float = 0.05
    eval_batch_size: int = 16


@dataclass(frozen=True, kw_only=True)
class CompareConfig(GridSettings):
    """`lorasb compare`'s options: what every cell shares (the model and data groups every cell's stages get,
    the task, the budget), then the grid's own."""

    eval_size: int | None = option(type=int, range=AT_LEAST_1, help="Rows of a built-in test set.")
    methods: str = option(
        required=True, help="Comma list of train methods and inits; NAME:R1/R2 sets one method's ranks, e.g. lora:8."
    )
    ranks: str = option(default="", show_default=False, help="Comma list of ranks for methods without their own.")
    seeds: int = option(default=3, range=AT_LEAST_1, help="Seeds 0..N-1 per cell.")
    lr: str = option(
        default="1e-3", help="Learning rate, or METHOD=LR,...,DEFAULT; an LR may be auto (train --lr auto)."
    )
    lr_sweep: bool = option(
        flag=True,
        default=False,
        help="Choose each method's lr first: validation loss on a slice of the training rows, seed 0, the method's "
        "first rank, over 5 half-decade steps around its --lr, extended at an edge until the best is inside.",
    )
    out: str = option("-o", "--out", required=True, help="Report directory (resumed if it holds finished cells).")


@dataclass(frozen=True, kw_only=True)
class MergeConfig(Declared):
    """`lorasb merge`'s options."""

    adapter: str = option("--adapter", "-a", required=True, help="Adapter directory written by lorasb train.")
    model: str | None = option("--model", "-m", help="Base model [default: the one recorded in the adapter].")
    format: str = option(
        "--format", default="hf", help="hf: merged checkpoint; peft: a PEFT LoRA adapter (lora_B = B·R)."
    )
    dtype: str | None = option(help="float32, bfloat16 or float16 [default: the base's].")
    max_shard_size: str | None = option(help="Re-shard, e.g. 5GB [default: keep the base's shards].")
    overwrite: bool = option(flag=True, default=False, help="Replace a non-empty -o.")
    trust_remote_code: bool = trust_remote_code()
    force_base: bool = force_base()
    allow_unverified: bool = allow_unverified()
    out: str = option("-o", "--out", required=True, help="Output directory.")

    # A recipe's top-level format is the training data's (prompt-response, ...), not the checkpoint's.
    RECIPE_SECTION_ONLY: ClassVar[frozenset[str]] = frozenset({"format"})


@dataclass(frozen=True, kw_only=True)
class InspectConfig(Declared):
    """`lorasb inspect`'s options."""

    path: str = argument()
    verify: bool = option(
        flag=True, default=False, help="Read every tensor and check it against the hash recorded when it was written."
    )
    plot: str | None = option(
        metavar="FILE.png",
        help="An update: draw captured energy against rank per module kind, and its recorded stability.",
    )


@dataclass(frozen=True, kw_only=True)
class DataSetConfig(Declared):
    """`lorasb data`'s options: the built-in data set `name` (or `list`), as `--data NAME` feeds a stage."""

    name: str = argument()
    split: str = redeclared(DataOptions, "split", help="train or test.")
    size: int | None = redeclared(DataOptions, "size", help="Rows [default: the set's own size].")
    seed: int = option(default=0, range=SEED, help="Seed of generation or subsetting.")
    out: str | None = option("-o", "--out", help="JSONL file to write [default: NAME-SPLIT.jsonl].")


@dataclass(frozen=True, kw_only=True)
class AppliedOptions(TemplateOptions, QuantizedModelOptions):
    """A model, an adapter applied to it unmerged, and how they are prompted (lorasb_cli/generation.py): evaluate
    and generate."""

    adapter: str | None = option("--adapter", "-a", help="Adapter directory (lorasb train -o), applied unmerged.")
    force_template: bool = force_template()
    force_base: bool = force_base()
    allow_unverified: bool = allow_unverified()
    template_of: str | None = option(
        metavar="RUN",
        help="Prompt as this adapter (lorasb train -o), factors file or merged model is prompted: its template and "
        "system prompt. Scores a base model the way its fine-tuned model is scored, so before and after compare.",
    )


# evaluate --max-length when not given (a prompt and its generated answer), capped at the model's limit
EVALUATE_MAX_LENGTH = 1024


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(DataOptions, AppliedOptions):
    """`lorasb evaluate`'s options: the model, adapter and data groups (the data defaulting to the task's), then its
    own."""

    task: str = option(
        "--task", "-t", required=True, help="gsm8k, math, commonsense, glue-*, classification, perplexity."
    )
    data: str | None = redeclared(
        DataOptions, "data", required=False, help="Local file, hub or built-in data set [default: the task's own]."
    )
    split: str | None = redeclared(
        DataOptions, "split", default=None, help="Split of a hub or built-in data set [default: the task's]."
    )
    data_config: str | None = redeclared(
        DataOptions, "data_config", help="Configuration of a hub data set [default: the task's]."
    )
    fields: str | None = redeclared(
        DataOptions, "fields", help="The task's fields named otherwise: question=COL,answer=COL."
    )
    limit: int | None = option(type=int, range=AT_LEAST_1, help="Evaluate the first N examples only.")
    max_new_tokens: int | None = option(type=int, range=AT_LEAST_1, help="Generation length [default: the task's].")
    max_length: int | None = redeclared(
        DataOptions,
        "max_length",
        help="Input tokens, at most.",
        show_default=f"{EVALUATE_MAX_LENGTH}, or the model's position limit if smaller",
    )
    scoring: str | None = option(help="generate or loglik (pick the most likely option) [default: the task's].")
    seed: int = option(default=0, range=SEED, help="Seed (decoding is greedy).")
    out: str = option("-o", "--out", default="results.json", help="Results JSON; predictions go beside it.")

    # A recipe's top-level data is what the model learns from; what it is scored on is the task's, or evaluate's own.
    RECIPE_SECTION_ONLY: ClassVar[frozenset[str]] = frozenset({"data", "split", "data_config", "fields", "size"})


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(AppliedOptions):
    """`lorasb generate`'s options: the model and adapter group, prompted as evaluate prompts, then its own. The
    prompts come from `--prompt`, else `--file`, else stdin (lorasb_cli/generate.py reads them)."""

    prompt: tuple[str, ...] = option("--prompt", "-p", multiple=True, metavar="TEXT", help="A prompt (repeatable).")
    file: str | None = option(
        metavar="FILE",
        help="Prompts from a file: .jsonl rows with a 'prompt' field, any other file one prompt per line.",
    )
    task: str | None = option(
        "--task",
        "-t",
        help="Answer as evaluate --task does: its stop strings and generation length; auto picks the template from "
        "its fields.",
    )
    stop: tuple[str, ...] = option(
        multiple=True, metavar="TEXT", help="Also stop at this string (repeatable); it is not printed."
    )
    max_new_tokens: int | None = option(
        type=int, range=AT_LEAST_1, help="Generation length.", show_default=f"the task's, else {MAX_NEW_TOKENS}"
    )
    temperature: float = option(default=0.0, range=NON_NEGATIVE, help="0: greedy; above 0: sample at this temperature.")
    top_p: float = option(
        default=1.0, range=FRACTION, help="Sample from the most likely tokens whose probability adds up to P."
    )
    seed: int = option(default=0, range=SEED, help="Seed of sampling: the same seed gives the same completions.")
