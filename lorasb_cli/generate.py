"""`lorasb generate`: answer prompts with a model, a model and an adapter, or a merged model, prompted as
`lorasb evaluate` prompts them (lorasb_cli/generation.py): the same template resolution, tokenization, stop
strings and generation length, so a prompt's completion here is evaluate's output for it.

Prompts come from `--prompt`, else `--file` (.jsonl rows with a `prompt` field; any other file, one prompt per
line), else stdin lines. Blank lines are skipped; a blank `--prompt` or `prompt` field is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from . import adapter, artifacts, generation, templates
from .configs import GenerateConfig
from .errors import BadInputError
from .tasks import MAX_NEW_TOKENS, GenerateTask, get_task, task_names

log = logging.getLogger("lorasb")

NO_PROMPT_HINT = "pass --prompt TEXT, --file FILE, or pipe prompts on stdin, one a line"


@dataclass(frozen=True)
class Completion:
    prompt: str  # as given, before the template
    completion: str  # the generated text, cut before the first stop string


def read_prompts(config: GenerateConfig, stdin: TextIO) -> list[str]:
    """The prompts of `--prompt`, else `--file`, else `stdin` (refused where it is a terminal: nothing would tell
    the user it waits for input)."""
    if config.prompt and config.file:
        raise BadInputError("--prompt and --file both given", hint="pass one of them")
    if config.prompt:
        if any(not p.strip() for p in config.prompt):
            raise BadInputError("--prompt is blank", hint="pass the text to answer")
        return list(config.prompt)
    if config.file:
        path = Path(config.file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise BadInputError(f"cannot read the prompt file: {e}", path=config.file, hint=NO_PROMPT_HINT) from e
        prompts = _jsonl_prompts(text, config.file) if path.suffix == ".jsonl" else _lines(text)
        source = config.file
    elif stdin.isatty():
        raise BadInputError("no prompt given", hint=NO_PROMPT_HINT)
    else:
        prompts, source = _lines(stdin.read()), "stdin"
    if not prompts:
        raise BadInputError(f"no prompts in {source}", hint=NO_PROMPT_HINT)
    return prompts


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _jsonl_prompts(text: str, file: str) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInputError(f"line {number} is not JSON: {e.msg}", path=file, hint="one JSON object a line") from e
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadInputError(
                f"line {number} has no 'prompt' text", path=file, hint='write rows as {"prompt": "..."}'
            )
        prompts.append(prompt)
    return prompts


def _generation_task(name: str) -> GenerateTask:
    task = get_task(name)
    if not isinstance(task, GenerateTask):
        generating = [n for n in task_names() if isinstance(get_task(n), GenerateTask)]
        raise BadInputError(
            f"task '{name}' is scored by {task.scoring}, not by generation",
            hint=f"pick one of {', '.join(generating)}, or drop --task",
        )
    return task


@artifacts.honours_allow_unverified
def generate(config: GenerateConfig, prompts: Sequence[str], stream: TextIO | None = None) -> Iterator[Completion]:
    """The completions of `prompts`, one at a time, greedy or (`--temperature` above 0) sampled; each is also
    written to `stream` token by token as it is generated, where given. Options, adapter and model are checked and
    loaded before this returns, so a bad input fails before any completion."""
    if config.temperature == 0 and config.top_p != 1.0:
        raise BadInputError("--top-p applies to sampling", hint="pass --temperature above 0, or drop --top-p")
    if any(not text for text in config.stop):
        raise BadInputError("--stop is empty", hint="pass the text to stop at")
    task = _generation_task(config.task) if config.task else None
    stop = (*(task.stop if task else ()), *config.stop)
    max_new_tokens = config.max_new_tokens or (task.max_new_tokens if task else MAX_NEW_TOKENS)
    saved = adapter.load_adapter(config.adapter) if config.adapter else None
    if saved is not None and saved.meta.labels:
        raise BadInputError(
            "the adapter is a sequence classifier: it answers with labels, not text",
            path=config.adapter,
            hint="score it with lorasb evaluate --task classification",
        )
    prompting = generation.resolve_prompting(config, task.fields if task else None, saved)
    model, tokenizer = generation.load_applied(config, saved)
    prompting = prompting.for_tokenizer(tokenizer)
    log.info("%s", prompting.describe())
    template = templates.Template(prompting.template, tokenizer, prompting.system_prompt)
    sampling = generation.Sampling(config.temperature, config.top_p, config.seed) if config.temperature > 0 else None

    def completions() -> Iterator[Completion]:
        for prompt in prompts:
            streamer = generation.StopStreamer(tokenizer, stop, stream) if stream is not None else None
            (output,) = generation.generate(
                model,
                tokenizer,
                [template.prompt(prompt)],
                add_special_tokens=template.add_special_tokens,
                max_new_tokens=max_new_tokens,
                stop=stop,
                sampling=sampling,
                streamer=streamer,
            )
            yield Completion(prompt, generation.cut(output, stop))

    return completions()
