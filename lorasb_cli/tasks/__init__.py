"""Evaluation tasks, one module per family (lm-evaluation-harness's shape): each defines its prompt, answer
extraction and metric in one place and registers itself with `@register_task`.

A task is one of four shapes, by how a model answers (lm-evaluation-harness's `output_type`): `GenerateTask`
(`generate_until`), `ChoiceTask` (`multiple_choice`), `ClassifyTask` (a sequence-classification head) and
`PerplexityTask` (`loglikelihood_rolling`). Each turns rows into per-example records itself (`records`).
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..errors import BadInputError
from ..registry import Registry, import_plugins

if TYPE_CHECKING:
    from ..templates import Template
    from .runner import Answerer

INVALID = "[invalid]"  # what extraction returns when an output holds no answer; never raises
MAX_NEW_TOKENS = 512  # a generate task's length unless it sets its own
SCORINGS = ("generate", "loglik", "classify", "perplexity")  # the `scoring` of each shape, in the results JSON


@dataclass(frozen=True, kw_only=True)
class Task:
    """What every task has. A task's functions of a row take one row of its data (a dict with its `fields`).

    `score(records)` turns the per-example records (dicts with at least `reference`, `extracted`, `correct`, and
    the row's `task` field where a family has subtasks) into the metrics dict of the results JSON. `metrics`
    names every number it reports (counts included), the primary one first: `metric`, what a table ranks by;
    `subtask_metrics` are also reported per subtask, as `NAME/<subtask>` (see `has_metric`). A value may be
    None where it is undefined (no records; a correlation of constant predictions). `lower_is_better` names the
    metrics ranked ascending (a loss, the invalid-answer rate), as lm-evaluation-harness's `higher_is_better`
    of its `metric_list`: every other metric ranks the higher the better (`higher_is_better`).
    """

    scoring: ClassVar[str]  # how a model answers, one of SCORINGS; `--scoring` may switch it (`scored_as`)

    name: str
    version: int
    fields: tuple[str, ...]
    score: Callable[[list[dict]], dict]
    metrics: tuple[str, ...]
    lower_is_better: tuple[str, ...] = ()
    subtask_metrics: tuple[str, ...] = ()
    default_data: str | None = None
    default_split: str = "test"
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """The primary metric: what a table ranks by unless told another."""
        return self.metrics[0]

    def higher_is_better(self, metric: str | None = None) -> bool:
        """Whether a higher value of `metric` (default: the primary one; `NAME/<subtask>` as NAME) ranks first."""
        return (metric or self.metric).partition("/")[0] not in self.lower_is_better

    def has_metric(self, name: str) -> bool:
        """Whether `score` can report `name`: one of `metrics`, or `NAME/<subtask>` for NAME in `subtask_metrics`."""
        prefix, slash, subtask = name.partition("/")
        return name in self.metrics or bool(slash and subtask and prefix in self.subtask_metrics)

    def scored_as(self, scoring: str | None) -> Task:
        """The task answered by `scoring` (None: its own); a BadInputError where the task cannot be."""
        if scoring is None or scoring == self.scoring:
            return self
        if scoring not in SCORINGS:
            raise BadInputError(f"unknown --scoring '{scoring}'", hint="use generate or loglik")
        raise BadInputError(
            f"task '{self.name}' is scored by {self.scoring}, not {scoring}", hint="leave --scoring out"
        )

    def records(self, rows: Sequence[dict], answerer: Answerer, template: Template) -> list[dict]:
        """One record per row, the rows answered by `answerer` (prompts rendered by `template`)."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class GenerateTask(Task):
    """Greedy generation from the rendered `prompt(row)` (`(instruction, input)`, unrendered: evaluate wraps them in
    the `--template` it shares with training), then `extract(output)`, compared with `reference(row)` by
    `is_correct`.

    `filters` are extra named answer extractions scored beside the primary `extract` (as lm-evaluation-harness's
    filters): for each name N, a record also holds `extracted/N` = `filters[N](output)` and `correct/N`, judged like
    `correct` (see `judge`). `choices(row)`, where given, lets `--scoring loglik` pick among the row's options.

    Generation stops at `max_new_tokens` or at a string of `stop` (lm-evaluation-harness's `until`); the output
    is cut before the first one (`cut`) whether or not the answerer stopped there, so none is ever scored.
    """

    scoring: ClassVar[str] = "generate"

    prompt: Callable[[dict], tuple[str, str | None]]
    reference: Callable[[dict], str]
    extract: Callable[[str], str]
    is_correct: Callable[[str, str], bool]
    filters: dict[str, Callable[[str], str]] = field(default_factory=dict)
    max_new_tokens: int = MAX_NEW_TOKENS
    stop: tuple[str, ...] = ()
    choices: Callable[[dict], list[str]] | None = None

    def scored_as(self, scoring: str | None) -> Task:
        if scoring != "loglik":
            return super().scored_as(scoring)
        if self.choices is None:
            raise BadInputError(f"task '{self.name}' has no answer options to score by log-likelihood")
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(Task)}  # same name, version, metric
        return ChoiceTask(
            **shared, prompt=self.prompt, choices=self.choices, reference=self.reference, is_correct=self.is_correct
        )

    def cut(self, output: str) -> str:
        """`output` up to the first of the stop strings (all of it where none occurs)."""
        from ..generation import cut  # torch comes with it: this registry is read by --help (configs.py)

        return cut(output, self.stop)

    def judge(self, output: str, reference: str) -> dict:
        """A generated output's record keys: `extracted`, `correct`, and `extracted/N`, `correct/N` per filter N."""
        judged = {}
        for suffix, extract in [("", self.extract), *((f"/{name}", f) for name, f in self.filters.items())]:
            extracted = extract(output)
            judged[f"extracted{suffix}"] = extracted
            judged[f"correct{suffix}"] = extracted != INVALID and self.is_correct(extracted, reference)
        return judged

    def records(self, rows: Sequence[dict], answerer: Answerer, template: Template) -> list[dict]:
        prompts = [template.prompt(*self.prompt(row)) for row in rows]
        records = []
        outputs = answerer.generate(prompts, max_new_tokens=self.max_new_tokens, stop=self.stop)
        for row, prompt, output in zip(rows, prompts, map(self.cut, outputs)):
            reference = self.reference(row)
            judged = self.judge(output, reference)
            extracted, correct = judged.pop("extracted"), judged.pop("correct")
            records.append(record(row, prompt, reference, output, extracted, correct) | judged)
        return records


@dataclass(frozen=True, kw_only=True)
class ChoiceTask(Task):
    """The option of `choices(row)` with the highest log-likelihood after the rendered `prompt(row)`, compared
    with `reference(row)` by `is_correct`. The record's `output` is the JSON of each option's log-likelihood."""

    scoring: ClassVar[str] = "loglik"

    prompt: Callable[[dict], tuple[str, str | None]]
    choices: Callable[[dict], list[str]]
    reference: Callable[[dict], str]
    is_correct: Callable[[str, str], bool] = operator.eq

    def records(self, rows: Sequence[dict], answerer: Answerer, template: Template) -> list[dict]:
        records = []
        for row in rows:
            prompt, options = template.prompt(*self.prompt(row)), self.choices(row)
            scores = answerer.loglik(prompt, options)
            best = options[max(range(len(options)), key=scores.__getitem__)]
            reference = self.reference(row)
            output = json.dumps(dict(zip(options, scores)))
            records.append(record(row, prompt, reference, output, best, self.is_correct(best, reference)))
        return records


def _label(row: dict):
    return row["label"]


@dataclass(frozen=True, kw_only=True)
class ClassifyTask(Task):
    """A sequence-classification model's argmax (its label name, else id) or score (regression) on `text(row)`,
    a text or a text pair. `correct` is None for a regression score."""

    scoring: ClassVar[str] = "classify"

    text: Callable[[dict], str | tuple[str, str]]
    reference: Callable[[dict], int | float | str] = _label

    def records(self, rows: Sequence[dict], answerer: Answerer, template: Template) -> list[dict]:
        texts = [self.text(row) for row in rows]
        records = []
        for row, text, predicted in zip(rows, texts, answerer.classify(texts)):
            reference = self.reference(row)
            correct = None if isinstance(predicted, float) else str(predicted) == str(reference)
            records.append(record(row, text, reference, predicted, predicted, correct))
        return records


@dataclass(frozen=True, kw_only=True)
class PerplexityTask(Task):
    """Each row's loss over its supervised tokens: records hold `loss` (the row's mean cross-entropy, nats) and
    `tokens` (how many it was taken over)."""

    scoring: ClassVar[str] = "perplexity"

    def records(self, rows: Sequence[dict], answerer: Answerer, template: Template) -> list[dict]:
        return [
            record(row, None, None, None, None, None) | {"loss": loss, "tokens": tokens}
            for row, (loss, tokens) in zip(rows, answerer.losses(rows))
        ]


def record(row: dict, prompt, reference, output, extracted, correct) -> dict:
    """The keys every record has, and the row's `task` (its subtask) where it has one."""
    out = {"input": prompt, "reference": reference, "output": output, "extracted": extracted, "correct": correct}
    if "task" in row:
        out["task"] = row["task"]
    return out


_REGISTRY: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    return _REGISTRY.register(task.name, task)


def _load_all() -> None:
    import_plugins(__name__, __path__)


def get_task(name: str) -> Task:
    _load_all()
    return _REGISTRY.lookup(name)


def task_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)
