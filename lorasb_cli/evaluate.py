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

from . import adapter, artifacts, data, files, generation, models, templates
from .configs import EVALUATE_MAX_LENGTH, EvaluateConfig
from .errors import BadInputError
from .tasks import Task, get_task
from .tasks.runner import Answerer, ModelAnswerer, evaluate_rows

log = logging.getLogger("lorasb")


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
        rows = rows[: config.limit]
    return rows, dataset.source


def load_for_task(
    config: EvaluateConfig, task: Task, scoring: str, saved: adapter.Adapter | None
) -> tuple[nn.Module, object]:
    """The model, with the adapter `saved` injected unmerged; a classifying task needs a sequence-classification
    model (or an adapter that brings its head)."""
    head = "sequence-classification" if scoring == "classify" else "causal-lm"
    if head == "sequence-classification":
        ref = models.resolve_model(config.model)
        arch = models.architectures(ref, trust_remote_code=config.trust_remote_code)
        has_head = any("SequenceClassification" in a for a in arch) or (saved is not None and saved.extra)
        if not has_head:
            raise BadInputError(
                f"task '{task.name}' needs a sequence-classification model; "
                f"'{ref.id}' is {', '.join(arch) or 'not one'}",
                hint="train one with --format classification (AutoModelForSequenceClassification), or pick a "
                "generation task",
            )
    return generation.load_applied(config, saved, head)


@artifacts.honours_allow_unverified
def evaluate(
    config: EvaluateConfig,
    progress: Callable[[int, int], None] | None = None,
    answerer: Answerer | None = None,
) -> EvaluateSummary:
    """Run `config.task` and write the results JSON and the predictions JSONL beside it."""
    for path in (config.out, predictions_path(config.out)):  # both checked before the run: never one of the two
        files.check_output(path, {"model": config.model, "adapter": config.adapter, "data": config.data})
    task = get_task(config.task).scored_as(config.scoring)  # before any data or model is loaded
    rows, source = load_task_rows(config, task)
    saved = adapter.load_adapter(config.adapter) if config.adapter and answerer is None else None
    prompting = (
        generation.resolve_prompting(config, list(rows[0]), saved)
        if answerer is None
        else generation.Prompting(templates.resolve(config.template, list(rows[0])), None, "a scripted answerer")
    )
    if task.scoring != "classify":  # a classifier reads rows as they are: no template
        log.info("%s", prompting.describe())
    if answerer is None:
        ref = models.resolve_model(config.model)
        max_length = models.fit_max_length(
            config.max_length, EVALUATE_MAX_LENGTH, ref, trust_remote_code=config.trust_remote_code
        )
        config = replace(config, max_length=max_length)
        model, tokenizer = load_for_task(config, task, task.scoring, saved)
        answerer = ModelAnswerer(
            model,
            tokenizer,
            template=prompting.template,
            system_prompt=prompting.system_prompt,
            batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens,  # None: the task's
            max_length=config.max_length,
        )
        template = answerer.template
    else:
        template = templates.Template(prompting.template, None)  # a scripted answerer: text templates only
    torch.manual_seed(config.seed)
    records = evaluate_rows(task, rows, answerer, template, progress=progress)
    metrics = task.score(records)
    results = {
        "task": task.name,
        "task_version": task.version,
        "scoring": task.scoring,
        "template": prompting.template,
        "template_source": prompting.source,
        "system_prompt": prompting.system_prompt,
        "count": len(records),
        "metrics": metrics,
        "config": {**vars(config), "data": source},
        "model": config.model,
        "adapter": saved.fields if saved is not None else None,
        "versions": artifacts.library_versions(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    out = Path(config.out)
    # Both written before either is renamed into place: a failed write leaves neither.
    with files.atomic_path(predictions_path(out)) as predictions, files.atomic_path(out) as summary:
        predictions.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
        summary.write_text(json.dumps(_finite(results), indent=2, default=str) + "\n")
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
