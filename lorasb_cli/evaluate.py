"""`lorasb evaluate`: score a base model, a base + adapter, or a merged model on a task (lorasb_cli/tasks).

Generation is batched with left padding and greedy decoding; an unmerged `--adapter` gives the same numbers
as its merged model. Writes the results JSON and, beside it, one JSONL line per example.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from . import adapter, artifacts, data, models, templates
from .errors import BadInputError
from .tasks import Task, get_task

log = logging.getLogger("lorasb")


class Answerer(Protocol):
    """What a task needs from a model; `ModelAnswerer` is the real one, tests script fake ones."""

    def generate(self, prompts: Sequence[str]) -> list[str]: ...

    def loglik(self, prompt: str, choices: Sequence[str]) -> list[float]: ...

    def classify(self, texts: Sequence[str | tuple[str, str]]) -> list[int | float | str]: ...

    def losses(self, rows: Sequence[dict]) -> list[tuple[float, int]]: ...


class ModelAnswerer:
    """A loaded HF model (with or without an injected adapter) answering in batches. Prompts are tokenized as
    `template` tokenizes them in training, so generation starts from exactly the training ids."""

    def __init__(self, model: nn.Module, tokenizer, *, template: str, batch_size: int, max_new_tokens: int,
                 max_length: int):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.template = templates.Template(template, tokenizer)
        self.batch_size, self.max_new_tokens, self.max_length = batch_size, max_new_tokens, max_length
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def generate(self, prompts: Sequence[str]) -> list[str]:
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id,
        )
        self.tokenizer.padding_side = "left"  # generation appends on the right: prompts must end together
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
        outputs: dict[int, str] = {}
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            encoded = self.tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                                     add_special_tokens=self.template.add_special_tokens).to(self.device)
            generated = self.model.generate(**encoded, generation_config=config)
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            for i, text in zip(chunk, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[i] = text
        return [outputs[i] for i in range(len(prompts))]

    @torch.no_grad()
    def loglik(self, prompt: str, choices: Sequence[str]) -> list[float]:
        """Σ log p(choice tokens | prompt) for each choice, the choice tokenized jointly with the prompt."""
        examples = []
        for choice in choices:
            ids, prompt_length, _ = self.template.encode(prompt, choice, eos=False)
            examples.append(data.Example(ids, [data.IGNORE] * prompt_length + ids[prompt_length:]))
        batch = {k: v.to(self.device) for k, v in data.collate(examples, self.tokenizer.pad_token_id).items()}
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (targets != data.IGNORE)).sum(dim=1).tolist()

    @torch.no_grad()
    def classify(self, texts: Sequence[str | tuple[str, str]]) -> list[int | float | str]:
        self.tokenizer.padding_side = "right"
        # Label names when the head has real ones; a default `LABEL_k` head answers with the id k.
        id2label = {
            i: name
            for i, name in (getattr(self.model.config, "id2label", None) or {}).items()
            if not re.fullmatch(r"LABEL_\d+", str(name))
        }
        predictions: list[int | float | str] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            pairs = [t if isinstance(t, tuple) else (t, None) for t in chunk]
            first, second = [p[0] for p in pairs], [p[1] for p in pairs]
            encoded = self.tokenizer(
                first, second if any(s is not None for s in second) else None,
                truncation=True, max_length=self.max_length, padding=True, return_tensors="pt",
            ).to(self.device)  # fmt: skip
            logits = self.model(**encoded).logits.float()
            if logits.shape[-1] == 1:  # regression (STS-B)
                predictions += logits[:, 0].tolist()
            else:
                predictions += [id2label.get(i, i) for i in logits.argmax(-1).tolist()]
        return predictions

    @torch.no_grad()
    def losses(self, rows: Sequence[dict]) -> list[tuple[float, int]]:
        from .estimate import per_sample_loss_sum

        fmt = data.detect_format(list(rows[0]), "auto")
        examples = data.encode(rows, fmt, self.tokenizer, self.max_length, template=self.template.name)
        results = []
        for example in examples:
            batch = {k: v.to(self.device) for k, v in data.collate([example], self.tokenizer.pad_token_id).items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, tokens = per_sample_loss_sum(logits, batch["labels"])
            results.append((float(loss), tokens))
        return results


def evaluate_rows(
    task: Task,
    rows: Sequence[dict],
    answerer: Answerer,
    template: templates.Template,
    scoring: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    chunk: int = 32,
) -> list[dict]:
    """Per-example records: input (the prompt as rendered by `template`), reference, raw output, extracted
    answer, correct (and the row's task; `extracted/NAME`, `correct/NAME` for each of the task's filters).

    Rows go to the answerer `chunk` at a time so `progress(done, total)` moves during long runs.
    """
    records: list[dict] = []
    for start in range(0, len(rows), chunk):
        records += _score_chunk(task, rows[start : start + chunk], answerer, template, scoring or task.scoring)
        if progress is not None:
            progress(len(records), len(rows))
    return records


def _score_chunk(
    task: Task, rows: Sequence[dict], answerer: Answerer, template: templates.Template, scoring: str
) -> list[dict]:
    records = []
    if scoring == "generate":
        prompts = [template.prompt(*task.prompt(row)) for row in rows]
        for row, prompt, output in zip(rows, prompts, answerer.generate(prompts)):
            reference = task.reference(row)
            judged = task.judge(output, reference)
            records.append(_record(row, prompt, reference, output, judged.pop("extracted"), judged.pop("correct"))
                           | judged)  # fmt: skip
    elif scoring == "loglik":
        if task.choices is None:
            raise BadInputError(f"task '{task.name}' has no answer options to score by log-likelihood")
        for row in rows:
            prompt, options = template.prompt(*task.prompt(row)), task.choices(row)
            scores = answerer.loglik(prompt, options)
            best = options[max(range(len(options)), key=scores.__getitem__)]
            reference = task.reference(row)
            records.append(_record(row, prompt, reference, json.dumps(dict(zip(options, scores))), best,
                                   task.is_correct(best, reference)))  # fmt: skip
    elif scoring == "classify":
        texts = [task.text(row) for row in rows]
        for row, text, predicted in zip(rows, texts, answerer.classify(texts)):
            reference = task.reference(row) if task.reference else row["label"]
            correct = None if isinstance(predicted, float) else str(predicted) == str(reference)
            records.append(_record(row, text, reference, predicted, predicted, correct))
    elif scoring == "perplexity":
        for row, (loss, tokens) in zip(rows, answerer.losses(rows)):
            record = _record(row, None, None, None, None, None)
            records.append({**record, "loss": loss, "tokens": tokens})
    else:
        raise BadInputError(f"unknown --scoring '{scoring}'", hint="use generate or loglik")
    return records


def _record(row: dict, prompt, reference, output, extracted, correct) -> dict:
    record = {"input": prompt, "reference": reference, "output": output, "extracted": extracted, "correct": correct}
    if "task" in row:
        record["task"] = row["task"]
    return record


@dataclass(frozen=True)
class EvaluateConfig:
    model: str
    task: str
    out: str
    adapter: str | None = None
    data: str | None = None
    split: str | None = None
    data_config: str | None = None
    fields: str | None = None
    size: int | None = None
    limit: int | None = None
    template: str = "auto"
    force_template: bool = False
    batch_size: int = 8
    max_new_tokens: int | None = None
    max_length: int = 1024
    scoring: str | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False


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
    dataset = data.load_dataset_rows(source, split, data_config, size=config.size, seed=config.seed,
                                     fields=config.fields, roles=task.fields)  # fmt: skip
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
    from safetensors import safe_open

    shard = next(iter(sorted(Path(ref.path).glob("*.safetensors"))), None) if Path(ref.path).is_dir() else None
    if shard is None:
        return None
    with safe_open(str(shard), framework="pt") as f:
        raw = (f.metadata() or {}).get(artifacts.METADATA_KEY)
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
                f"task '{task.name}' needs a sequence-classification model; '{ref.id}' is {', '.join(arch) or 'not one'}",
                hint="train one with --format classification (AutoModelForSequenceClassification), or pick a "
                "generation task",
            )
    if saved is not None:
        shapes = models.linear_shapes_from_config(ref, trust_remote_code=config.trust_remote_code, head=head)
        from .train import check_factors_fit

        check_factors_fit(saved.factors, shapes, ref.id, str(saved.path))
    device = models.resolve_device(config.device)
    dtype = models.resolve_dtype(config.dtype, device)
    labels = saved.config.get("labels") if saved is not None else None
    model, tokenizer = models.load_model(
        ref, dtype=dtype, device=device, trust_remote_code=config.trust_remote_code, head=head, labels=labels
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
    task = get_task(config.task)
    scoring = config.scoring or task.scoring
    rows, source = load_task_rows(config, task)
    saved = adapter.load_adapter(config.adapter) if config.adapter and answerer is None else None
    if saved is not None:
        recorded = (saved.config.get("data") or {}).get("template")
    else:
        recorded = merged_template(models.resolve_model(config.model)) if answerer is None else None
    template_name = resolve_template(config, list(rows[0]), recorded)
    if answerer is None:
        model, tokenizer = load_for_task(config, task, scoring, saved)
        answerer = ModelAnswerer(
            model, tokenizer, template=template_name, batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens or task.max_new_tokens, max_length=config.max_length,
        )  # fmt: skip
        template = answerer.template
    else:
        template = templates.Template(template_name, None)  # a scripted answerer: text templates only
    torch.manual_seed(config.seed)
    records = evaluate_rows(task, rows, answerer, template, scoring, progress)
    metrics = task.score(records)
    results = {
        "task": task.name,
        "task_version": task.version,
        "scoring": scoring,
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
