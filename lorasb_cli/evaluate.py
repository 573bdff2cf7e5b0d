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

from . import adapter, artifacts, data, files, metadata, models, templates
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


@dataclass(frozen=True)
class Prompting:
    """How evaluate renders prompts: the template, the chat system prompt, and where they came from."""

    template: str
    system_prompt: str | None
    source: str  # e.g. "recorded in the adapter run/", "picked from the fields answer, question"


def resolve_prompting(config: EvaluateConfig, columns: Sequence[str], saved: adapter.Adapter | None) -> Prompting:
    """The template and system prompt that the adapter, the merged model or `--template-of` recorded, unless
    `--template` names another template (an error without `--force-template`); `auto` otherwise picks from the
    fields. `--system-prompt` replaces a recorded system prompt."""
    if config.template_of and config.adapter:
        raise BadInputError(
            "--template-of prompts a model as another adapter is prompted; --adapter brings its own template",
            hint="drop --template-of",
        )
    if config.template_of:
        recorded, where = recorded_prompting(config.template_of), f"recorded in {config.template_of} (--template-of)"
    elif saved is not None:
        recorded, where = saved.meta.data or metadata.DataProvenance(), f"recorded in the adapter {config.adapter}"
    else:
        model_dir = Path(models.resolve_model(config.model).path)  # a hub id records nothing lorasb wrote
        recorded, where = (
            recorded_prompting(str(model_dir)) if model_dir.is_dir() else metadata.DataProvenance(),
            "recorded in the merged model",
        )
    if config.template == "auto" and recorded.template is not None:
        template, source = recorded.template, where
    else:
        template = templates.resolve(config.template, columns)
        templates.check_same(recorded.template, template, "training", force=config.force_template)
        source = "--template" if config.template != "auto" else f"picked from the fields {', '.join(sorted(columns))}"
    if config.system_prompt is None:
        system_prompt = recorded.system_prompt if template == "chat" else None
    else:
        system_prompt = templates.system_prompt(config.system_prompt, template, ())
        if recorded.system_prompt not in (None, system_prompt):
            log.warning("--system-prompt replaces the system prompt training used, %r", recorded.system_prompt)
    return Prompting(template, system_prompt, source)


def recorded_prompting(path: str) -> metadata.DataProvenance:
    """The data provenance (`template`, `system_prompt`) that an adapter directory, a factors file or a merged
    model records; empty for a model lorasb did not write."""
    folder = Path(path)
    file = folder / adapter.ADAPTER_FILE if folder.is_dir() else folder
    if file.is_file():
        return artifacts.Artifact(file, kinds=("adapter", "factors")).meta.data or metadata.DataProvenance()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise BadInputError(
            "not an adapter, factors file or model directory", path=path, hint="pass a lorasb train -o or merge -o"
        )
    return artifacts.merged_from(folder).prompting()


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
        what = "the adapter" if isinstance(saved.meta, metadata.AdapterMeta) else "the factors"
        models.check_base(saved.meta.base_model, ref, what=what, path=str(saved.path), force=config.force_base)
    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    labels = saved.meta.labels if saved is not None else None
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
        resolve_prompting(config, list(rows[0]), saved)
        if answerer is None
        else Prompting(templates.resolve(config.template, list(rows[0])), None, "a scripted answerer")
    )
    if task.scoring != "classify":  # a classifier reads rows as they are: no template
        log.info(
            "template: %s (%s)%s",
            prompting.template,
            prompting.source,
            f", system prompt {templates.shorten(prompting.system_prompt)!r}" if prompting.system_prompt else "",
        )
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
