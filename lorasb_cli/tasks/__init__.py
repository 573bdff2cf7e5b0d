"""Evaluation tasks, one module per family (lm-evaluation-harness's shape): each defines its prompt, answer
extraction and metric in one place and registers itself with `@register_task`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..registry import Registry, import_plugins

INVALID = "[invalid]"  # what extraction returns when an output holds no answer; never raises


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    `prompt(row)` returns `(instruction, input)`: the row's instruction text and its optional extra input (a str
    or None), unrendered. The evaluate stage wraps them in the `--template` it shares with training, so a task
    never fixes the template a model was trained with.

    `scoring` says how a model answers:
      - "generate": greedy generation from the rendered prompt, then `extract(output)`, compared with
        `reference(row)` by `is_correct`;
      - "loglik": pick the option of `choices(row)` with the highest log-likelihood after the rendered prompt;
      - "classify": a sequence-classification model's argmax (or score, for regression) on `text(row)`;
      - "perplexity": mean loss over the supervised tokens of each row.
    `filters` are extra named answer extractions scored beside the primary `extract` (as lm-evaluation-harness's
    filters): for each name N, a record also holds `extracted/N` = `filters[N](output)` and `correct/N`, judged like
    `correct` (see `judge`).
    `score(records)` turns the per-example records (dicts with at least `reference`, `extracted`, `correct`, the
    `extracted/N`/`correct/N` keys of the filters, and the row's `task` field where a family has subtasks) into the
    metrics dict of the results JSON.
    """

    name: str
    version: int
    scoring: str
    fields: tuple[str, ...]
    score: Callable[[list[dict]], dict[str, float]]
    prompt: Callable[[dict], tuple[str, str | None]] | None = None
    reference: Callable[[dict], str] | None = None
    extract: Callable[[str], str] | None = None
    is_correct: Callable[[str, str], bool] | None = None
    choices: Callable[[dict], list[str]] | None = None
    text: Callable[[dict], str | tuple[str, str]] | None = None
    default_data: str | None = None
    default_split: str = "test"
    max_new_tokens: int = 512
    description: str = ""
    extra: dict = field(default_factory=dict)
    filters: dict[str, Callable[[str], str]] = field(default_factory=dict)

    def judge(self, output: str, reference: str) -> dict:
        """A generated output's record keys: `extracted`, `correct`, and `extracted/N`, `correct/N` per filter N."""
        judged = {}
        for suffix, extract in [("", self.extract), *((f"/{name}", f) for name, f in self.filters.items())]:
            extracted = extract(output)
            judged[f"extracted{suffix}"] = extracted
            judged[f"correct{suffix}"] = extracted != INVALID and self.is_correct(extracted, reference)
        return judged


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
