"""CommonSense170K's eight tasks in the LLM-Adapters format: the prompt is `instruction` (evaluate renders the
template; `auto` picks Alpaca, as LLM-Adapters does), the first answer word of the output (`true`, `solution2`,
`answer3`, `option1`, `ending4`, ...), accuracy per task and averaged over tasks. `--scoring loglik` picks the
likeliest of the row's answer words instead."""

from __future__ import annotations

import re
from collections import defaultdict

from ..errors import BadInputError
from . import INVALID, GenerateTask, register_task

# Each task's answer words where a row does not list them (ARC and OBQA rows may have three to five options;
# LLM-Adapters' "Answer format:" line says how many).
WORDS = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "siqa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "arc-e": ("answer1", "answer2", "answer3", "answer4"),
    "arc-c": ("answer1", "answer2", "answer3", "answer4"),
    "obqa": ("answer1", "answer2", "answer3", "answer4"),
}
# LLM-Adapters' data set folder names and other common spellings of the eight tasks.
ALIASES = {
    "social_i_qa": "siqa",
    "socialiqa": "siqa",
    "arc-easy": "arc-e",
    "arc_easy": "arc-e",
    "arc-challenge": "arc-c",
    "arc_challenge": "arc-c",
    "openbookqa": "obqa",
}
# The answer word's form names the task where only one task uses it; `answerN` is shared by four.
_FORM_TASK = {"true": "boolq", "false": "boolq", "solution": "piqa", "option": "winogrande", "ending": "hellaswag"}
_ANY_WORD = re.compile(r"\b(true|false|solution[12]|answer[1-5]|option[12]|ending[1-4])\b")
_FORMAT_LINE = re.compile(r"answer format\s*:\s*([a-z0-9]+(?:\s*/\s*[a-z0-9]+)+)", re.IGNORECASE)


def subtask(row: dict) -> str:
    """The row's task (normalized name), or the one its answer word implies, else "commonsense"."""
    name = str(row.get("task") or "").strip().lower()
    if name:
        return ALIASES.get(name, name)
    form = re.sub(r"\d+$", "", str(row.get("answer", row.get("reference", ""))).strip().lower())
    return _FORM_TASK.get(form, "commonsense")


def prompt(row: dict) -> tuple[str, str | None]:
    """LLM-Adapters' prompt, unrendered: (`instruction`, `input`), the input None where a row has none or it is
    empty."""
    return row["instruction"], row.get("input") or None


def extract_answer(output: str) -> str:
    """The first answer word in the output (LLM-Adapters' regex, of any task's form), or INVALID."""
    match = _ANY_WORD.search(output.lower())
    return match[1] if match else INVALID


def choices(row: dict) -> list[str]:
    """The row's answer words: its "Answer format: a/b/..." line, else its task's words."""
    line = _FORMAT_LINE.search(str(row.get("instruction", "")))
    if line:
        return [w.strip().lower() for w in line[1].split("/")]
    task = subtask(row)
    if task not in WORDS:
        raise BadInputError(
            f"cannot tell the answer options of a '{task}' row without an 'Answer format:' line",
            hint="use LLM-Adapters' instructions, or add a 'task' field (boolq, piqa, siqa, ...)",
        )
    return list(WORDS[task])


def score(records: list[dict]) -> dict[str, float]:
    """`accuracy/<task>` and `count/<task>` per task; `accuracy` is their mean (the paper's average),
    `accuracy_micro` the share of all rows, `invalid` the share of outputs with no answer word."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        by_task[subtask(record)].append(bool(record["correct"]))
    metrics: dict[str, float] = {}
    for task in sorted(by_task):
        metrics[f"accuracy/{task}"] = sum(by_task[task]) / len(by_task[task])
        metrics[f"count/{task}"] = len(by_task[task])
    n = len(records)
    per_task = [metrics[f"accuracy/{task}"] for task in by_task]
    metrics["accuracy"] = sum(per_task) / len(per_task) if per_task else None
    metrics["accuracy_micro"] = sum(sum(v) for v in by_task.values()) / n if n else None
    metrics["invalid"] = sum(r["extracted"] == INVALID for r in records) / n if n else None
    metrics["count"] = n
    return metrics


register_task(
    GenerateTask(
        name="commonsense",
        version=1,
        fields=("instruction", "answer"),
        score=score,
        metrics=("accuracy", "accuracy_micro", "invalid", "count"),
        lower_is_better=("invalid",),
        subtask_metrics=("accuracy", "count"),
        prompt=prompt,
        reference=lambda row: str(row["answer"]).strip().lower(),
        extract=extract_answer,
        is_correct=lambda extracted, reference: extracted == reference,
        choices=choices,
        max_new_tokens=32,
        description="CommonSense170K's 8 tasks (LLM-Adapters format): first answer word, per-task and mean accuracy",
    )
)
