"""Running a task on a model: the answerer that generates, scores choices, classifies or measures loss in
batches, and `evaluate_rows`, which turns a task's rows into per-example records. `lorasb evaluate` and
`lorasb train --eval-task` both score through here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from .. import data, generation, loss, templates
from . import MAX_NEW_TOKENS, Task


class Answerer(Protocol):
    """What a task needs from a model; `ModelAnswerer` is the real one, tests script fake ones."""

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int | None = None, stop: Sequence[str] = ()
    ) -> list[str]: ...

    def loglik(self, prompt: str, choices: Sequence[str]) -> list[float]: ...

    def classify(self, texts: Sequence[str | tuple[str, str]]) -> list[int | float | str]: ...

    def losses(self, rows: Sequence[dict]) -> list[tuple[float, int]]: ...


class ModelAnswerer:
    """A loaded HF model (with or without an injected adapter) answering in batches. Prompts are tokenized as
    `template` tokenizes them in training, so generation starts from exactly the training ids.

    `max_new_tokens`, where given (`--max-new-tokens`), overrides the length each `generate` call asks for."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        template: str | None,
        batch_size: int,
        max_length: int,
        max_new_tokens: int | None = None,
        system_prompt: str | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.template = templates.Template(template, tokenizer, system_prompt)
        self.batch_size, self.max_new_tokens, self.max_length = batch_size, max_new_tokens, max_length
        self.device = next(model.parameters()).device

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int | None = None, stop: Sequence[str] = ()
    ) -> list[str]:
        """Greedy continuations of `prompts`, at most `max_new_tokens` tokens each (the task's, unless the
        answerer's own overrides it). A continuation also ends once it ends with a string of `stop`, which it
        keeps: the task cuts it off."""
        return generation.generate(
            self.model,
            self.tokenizer,
            prompts,
            add_special_tokens=self.template.add_special_tokens,
            max_new_tokens=self.max_new_tokens or max_new_tokens or MAX_NEW_TOKENS,
            stop=stop,
            batch_size=self.batch_size,
        )

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
                first,
                second if any(s is not None for s in second) else None,
                truncation=True,
                max_length=self.max_length,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**encoded).logits.float()
            if logits.shape[-1] == 1:  # regression (STS-B)
                predictions += logits[:, 0].tolist()
            else:
                predictions += [id2label.get(i, i) for i in logits.argmax(-1).tolist()]
        return predictions

    @torch.no_grad()
    def losses(self, rows: Sequence[dict]) -> list[tuple[float, int]]:
        """Each row's mean loss over its supervised tokens and their count, `batch_size` rows per forward pass."""
        fmt = data.detect_format(list(rows[0]), "auto")
        examples = data.encode(
            rows, fmt, self.tokenizer, self.max_length, template=self.template.name, system_prompt=self.template.system
        )
        results = []
        # In row order, so results line up with `rows`.
        for batch in data.make_batches(examples, self.batch_size, self.tokenizer.pad_token_id, sort_by_length=False):
            logits = self.model(**loss.model_inputs(batch, self.device)).logits
            labels = batch["labels"].to(self.device)
            for row in range(len(labels)):  # right padding: a row's logits are its own, its pad labels IGNORE
                total, tokens = loss.per_sample_loss_sum(logits[row : row + 1], labels[row : row + 1])
                results.append((float(total), tokens))
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
    """Per-example records of `task` answered by `scoring` (None: the task's own; see `Task.scored_as`): input
    (the prompt as rendered by `template`), reference, raw output, extracted answer, correct (and the row's task;
    `extracted/NAME`, `correct/NAME` for each of the task's filters).

    Rows go to the answerer `chunk` at a time so `progress(done, total)` moves during long runs.
    """
    task = task.scored_as(scoring)
    records: list[dict] = []
    for start in range(0, len(rows), chunk):
        records += task.records(rows[start : start + chunk], answerer, template)
        if progress is not None:
            progress(len(records), len(rows))
    return records
