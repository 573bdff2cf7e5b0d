"""`lorasb evaluate`: score a base model, a base + adapter, or a merged model on a task (lorasb_cli/tasks).

Generation is batched with left padding and greedy decoding; an unmerged `--adapter` gives the same numbers
as its merged model. Writes the results JSON and, beside it, one JSONL line per example.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from . import adapter, artifacts, data, models, shards, templates
from .errors import BadInputError
from .options import DataOptions, ModelOptions, force_template, option
from .tasks import Task, get_task
from .tasks.runner import Answerer, ModelAnswerer, evaluate_rows

log = logging.getLogger("lorasb")

MAX_LENGTH = 1024  # --max-length when not given (a prompt and its generated answer), capped at the model's limit


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(DataOptions, ModelOptions):
    """`lorasb evaluate`'s options: the model and data groups (the data defaulting to the task's), then its own."""

    adapter: str | None = option("--adapter", "-a", help="Adapter directory (lorasb train -o) to evaluate unmerged.")
    task: str = option(
        "--task", "-t", required=True, help="gsm8k, math, commonsense, glue-*, classification, perplexity."
    )
    data: str | None = option("--data", "-d", help="Local file or hub data set [default: the task's own].")
    split: str | None = option(help="Split of a hub or built-in data set [default: the task's].")
    data_config: str | None = option(help="Configuration of a hub data set [default: the task's].")
    fields: str | None = option(help="The task's fields named otherwise: question=COL,answer=COL.")
    force_template: bool = force_template()
    limit: int | None = option(type=int, help="Evaluate the first N examples only.")
    batch_size: int = option(default=8, help="Examples per batch.")
    max_new_tokens: int | None = option(type=int, help="Generation length [default: the task's].")
    max_length: int | None = option(
        type=int, help="Input tokens, at most.", show_default=f"{MAX_LENGTH}, or the model's position limit if smaller"
    )
    scoring: str | None = option(help="generate or loglik (pick the most likely option) [default: the task's].")
    seed: int = option(default=0, help="Seed (decoding is greedy).")
    out: str = option("-o", "--out", default="results.json", help="Results JSON; predictions go beside it.")


@dataclass
class EvaluateSummary:
    path: Path
    predictions: Path
    count: int
    metrics: dict


def predictions_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.predictions.jsonl")


def load_task_rows(config: EvaluateConfig, task: Task) -> tuple[Sequence[dict], str]:
    """Rows of the task's data (`--data`, or the task's default hub data set), checked for the task's fields;
    `--fields` names the task's fields (e.g. question=problem_text)."""
    source = config.data or task.default_data
    if source is None:
        raise BadInputError(f"task '{task.name}' has no default data set", hint="pass --data FILE")
    split = config.split or task.default_split
    data_config = config.data_config or (None if config.data else task.extra.get("config"))
    dataset = data.load_dataset_rows(
        source, split, data_config, size=config.size, seed=config.seed, fields=config.fields, roles=task.fields
    )
    rows = dataset.rows
    missing = [f for f in task.fields if f not in rows[0]]
    if missing:
        raise BadInputError(
            f"task '{task.name}' needs the fields {', '.join(task.fields)}; the data lacks {', '.join(missing)}",
            path=dataset.source,
            hint="name them with --fields FIELD=COLUMN or pick the matching task",
        )
    if config.limit is not None:
        if config.limit < 1:
            raise BadInputError(f"--limit {config.limit} must be positive")
        rows = rows[: config.limit]
    return rows, dataset.source


def resolve_template(config: EvaluateConfig, columns: Sequence[str], recorded: str | None) -> str:
    """The template prompts are rendered with: the one the adapter (or merged model) was trained with, unless
    `--template` names another (an error without `--force-template`); `auto` otherwise picks from the fields."""
    if config.template == "auto" and recorded is not None:
        return recorded
    used = templates.resolve(config.template, columns)
    templates.check_same(recorded, used, "training", force=config.force_template)
    return used


def merged_template(ref: models.ModelRef) -> str | None:
    """The template a `lorasb merge` checkpoint was trained with (its safetensors metadata), else None."""
    shard = next(iter(sorted(Path(ref.path).glob("*.safetensors"))), None) if Path(ref.path).is_dir() else None
    if shard is None:
        return None
    # The header alone (shards.read_header: one-line error if unreadable); the weights are checked by loading.
    metadata = shards.read_header(shard).get("__metadata__")
    raw = metadata.get(artifacts.METADATA_KEY) if isinstance(metadata, dict) else None
    merged_from = artifacts.parse_metadata(raw, str(shard)).get("merged_from") if raw else None
    return merged_from.get("template") if isinstance(merged_from, dict) else None


def load_for_task(
    config: EvaluateConfig, task: Task, scoring: str, saved: adapter.Adapter | None
) -> tuple[nn.Module, object]:
    """The model, with the adapter `saved` injected unmerged."""
    ref = models.resolve_model(config.model)
    head = "sequence-classification" if scoring == "classify" else "causal-lm"
    if head == "sequence-classification":
        arch = models.architectures(ref, trust_remote_code=config.trust_remote_code)
        has_head = any("SequenceClassification" in a for a in arch) or (saved is not None and saved.extra)
        if not has_head:
            raise BadInputError(
                f"task '{task.name}' needs a sequence-classification model; "
                f"'{ref.id}' is {', '.join(arch) or 'not one'}",
                hint="train one with --format classification (AutoModelForSequenceClassification), or pick a "
                "generation task",
            )
    if saved is not None:
        shapes = models.linear_shapes_from_config(ref, trust_remote_code=config.trust_remote_code, head=head)
        saved.check_fits(shapes, f"model '{ref.id}'", hint="pass the model the adapter was trained on")
    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    labels = saved.config.get("labels") if saved is not None else None
    model, tokenizer = models.load_model(
        ref,
        dtype=dtype,
        device=device,
        trust_remote_code=config.trust_remote_code,
        head=head,
        labels=labels,
        allow_pickle=config.allow_pickle,
    )
    if saved is None:
        return model, tokenizer
    adapter.inject(model, saved.factors, scale=saved.scale, magnitudes=saved.magnitudes)
    adapter.load_extra(model, saved.extra, trainable=False)
    model.eval()
    return model, tokenizer


def evaluate(
    config: EvaluateConfig,
    progress: Callable[[int, int], None] | None = None,
    answerer: Answerer | None = None,
) -> EvaluateSummary:
    """Run `config.task` and write the results JSON and the predictions JSONL beside it."""
    for value, flag in ((config.batch_size, "--batch-size"), (config.max_new_tokens, "--max-new-tokens")):
        if value is not None and value < 1:
            raise BadInputError(f"{flag} {value} must be positive")
    for path in (config.out, predictions_path(config.out)):  # both checked before the run: never one of the two
        artifacts.check_output(path, {"model": config.model, "adapter": config.adapter, "data": config.data})
    task = get_task(config.task).scored_as(config.scoring)  # before any data or model is loaded
    rows, source = load_task_rows(config, task)
    saved = adapter.load_adapter(config.adapter) if config.adapter and answerer is None else None
    if saved is not None:
        recorded = (saved.config.get("data") or {}).get("template")
    else:
        recorded = merged_template(models.resolve_model(config.model)) if answerer is None else None
    template_name = resolve_template(config, list(rows[0]), recorded)
    if answerer is None:
        ref = models.resolve_model(config.model)
        max_length = models.fit_max_length(
            config.max_length, MAX_LENGTH, ref, trust_remote_code=config.trust_remote_code
        )
        config = replace(config, max_length=max_length)
        model, tokenizer = load_for_task(config, task, task.scoring, saved)
        answerer = ModelAnswerer(
            model,
            tokenizer,
            template=template_name,
            batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens,  # None: the task's
            max_length=config.max_length,
        )
        template = answerer.template
    else:
        template = templates.Template(template_name, None)  # a scripted answerer: text templates only
    torch.manual_seed(config.seed)
    records = evaluate_rows(task, rows, answerer, template, progress=progress)
    metrics = task.score(records)
    results = {
        "task": task.name,
        "task_version": task.version,
        "scoring": task.scoring,
        "template": template_name,
        "count": len(records),
        "metrics": metrics,
        "config": {**vars(config), "data": source},
        "model": config.model,
        "adapter": saved.config if saved is not None else None,
        "versions": artifacts.library_versions(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    out = Path(config.out)
    with artifacts.atomic_path(predictions_path(out)) as tmp:
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    with artifacts.atomic_path(out) as tmp:
        tmp.write_text(json.dumps(_finite(results), indent=2, default=str) + "\n")
    return EvaluateSummary(path=out, predictions=predictions_path(out), count=len(records), metrics=metrics)


def _finite(value):
    """NaN/Inf (e.g. a correlation over constant predictions) as null: the results stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
