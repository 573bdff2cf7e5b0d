"""Prompt templates and the exact prompt/response token boundary (docs/design.md §3).

A prompt-response row becomes `template(prompt) + response`, tokenized **jointly**, so the training ids begin
with exactly the ids generation feeds for that prompt. Tokenizing the two parts separately is wrong on
SentencePiece tokenizers (Llama-2, Mistral, Gemma): the response alone gets a dummy-prefix `▁The` where the
model, after the prompt's newline, sees and produces `The`.

Templates: `plain` (the prompt exactly as given), `alpaca` (the template MetaMathQA and the LoRA-SB reference
train with) and `chat` (the tokenizer's own chat template). `auto` follows TRL's dataset types.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import BadInputError
from .registry import did_you_mean
from .schema import FIELD_PAIRS, MESSAGES, messages_problem, prompt_response_fields, text_problem

log = logging.getLogger("lorasb")

IGNORE = -100  # label of positions that carry no loss (prompt, padding)
NAMES = ("auto", "plain", "alpaca", "chat")
# The template of instruction-style rows and of prompts where the data named none (text or classification rows
# scored on a generation task): the paper's, MetaMathQA's.
DEFAULT = "alpaca"

ALPACA = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def resolve(
    requested: str, columns: Sequence[str], fmt: str = "prompt-response", *, announce: bool = False
) -> str | None:
    """The concrete template (`plain`, `alpaca` or `chat`) of `fmt` rows with these fields: `requested`, or for
    `auto` the one the fields imply. None for the formats without a prompt (text, classification, regression).
    `announce`: log what `auto` picked (the training stages; evaluate reports its template and where it came from)."""
    if fmt != "prompt-response":
        return None
    if requested not in NAMES:
        raise BadInputError(f"unknown --template '{requested}'", hint=did_you_mean(requested, NAMES))
    if requested != "auto":
        return requested
    fields = prompt_response_fields(dict.fromkeys(columns))
    name = "chat" if fields == (MESSAGES,) else dict(FIELD_PAIRS).get(fields, DEFAULT)
    if announce:
        log.info("--template auto: picked %s from the fields %s", name, ", ".join(sorted(columns)))
    return name


def shared_system_turn(rows: Sequence[dict]) -> str | None:
    """The system turn every conversational row opens with, when they all share one; else None."""
    shared = None
    for row in rows:
        messages = row.get(MESSAGES)
        first = messages[0] if isinstance(messages, list) and messages and isinstance(messages[0], dict) else {}
        if first.get("role") != "system" or (shared is not None and first.get("content") != shared):
            return None
        shared = first.get("content")
    return shared if isinstance(shared, str) else None


def system_prompt(given: str | None, template: str | None, rows: Sequence[dict]) -> str | None:
    """The system turn of rows without one: `--system-prompt`, else the one every training row shares (so
    evaluation prompts open as training rows did, not with the tokenizer's default); chat template only."""
    if template != "chat":
        if given is not None:
            raise BadInputError(
                f"--system-prompt is a turn of the chat template, not of {template or 'this format'}",
                hint="pass --template chat, or drop --system-prompt",
            )
        return None
    if given is not None:
        return given
    shared = shared_system_turn(rows)
    if shared is not None:
        log.info("system prompt: the one every training row opens with, %r", shorten(shared))
    return shared


def shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def check_same(recorded: str | None, used: str, what: str, *, force: bool) -> None:
    """Refuse a template other than the one `what` was made with (a model answers in the template it learned)."""
    if recorded is None or recorded == used:
        return
    if force:
        log.warning("--force-template: using template %s although %s used %s", used, what, recorded)
        return
    raise BadInputError(
        f"template {used} differs from the template {recorded} that {what} used",
        hint=f"pass --template {recorded}, or --force-template to use {used} anyway",
    )


@dataclass(frozen=True)
class Template:
    """A concrete template bound to a tokenizer: renders prompts and encodes prompt + response jointly."""

    name: str | None  # plain | alpaca | chat; None: the data named none (text or classification rows), DEFAULT
    tokenizer: object
    system: str | None = None  # chat: the system turn of prompts and rows that have none

    def __post_init__(self):
        if self.name is None:
            object.__setattr__(self, "name", DEFAULT)
        if self.name == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise BadInputError(
                "--template chat: the tokenizer has no chat template",
                hint="pass --template alpaca or plain, or a model whose tokenizer defines one",
            )

    @property
    def add_special_tokens(self) -> bool:
        """A chat template writes its own BOS into the text; the others get the tokenizer's special tokens."""
        return self.name != "chat"

    def prompt(self, instruction: str, input: str | None = None) -> str:
        """The text generation starts from for one instruction (and optional input)."""
        if self.name == "plain":
            return instruction if not input else f"{instruction}\n\n{input}"
        if self.name == "alpaca":
            if input:
                return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
            return ALPACA.format(instruction=instruction)
        content = instruction if not input else f"{instruction}\n\n{input}"
        return self._chat(self._with_system([{"role": "user", "content": content}]))

    def split(self, row: dict) -> tuple[str, str]:
        """(rendered prompt, response text) of a prompt-response row."""
        fields = prompt_response_fields(row)
        if fields is None:
            raise BadInputError(f"row lacks prompt/response fields: {sorted(row)}")
        if fields == (MESSAGES,):
            return self._split_messages(row[MESSAGES])
        prompt_key, response_key = fields
        extra = row.get("input") if prompt_key == "instruction" else None
        # A blank response leaves nothing to supervise but EOS: a broken row, not a sample.
        response = _text(row, response_key, blank=False)
        return self.prompt(_text(row, prompt_key), _text(row, "input") if extra else None), response

    def _with_system(self, messages: list[dict]) -> list[dict]:
        """`messages` opened by the system turn, unless they have their own (or there is none to add)."""
        if self.system is None or (messages and messages[0].get("role") == "system"):
            return messages
        return [{"role": "system", "content": self.system}, *messages]

    def _chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _split_messages(self, messages) -> tuple[str, str]:
        """The conversation up to its last assistant turn as the prompt; that turn, as rendered, the response."""
        if self.name != "chat":
            raise BadInputError(
                f"conversational rows (a '{MESSAGES}' field) need --template chat, not {self.name}",
                hint="pass --template chat (or auto)",
            )
        problem = messages_problem(messages)
        if problem:
            raise BadInputError(problem)
        context = self._with_system([dict(m) for m in messages[:-1]])
        prompt = self._chat(context)
        whole = self.tokenizer.apply_chat_template([*context, dict(messages[-1])], tokenize=False)
        # The rendered turn carries the template's end-of-turn marker, which the model must learn to emit.
        response = whole[len(prompt) :] if whole.startswith(prompt) else str(messages[-1].get("content", ""))
        return prompt, response.rstrip()

    def prompt_ids(self, prompt: str) -> list[int]:
        """The ids generation feeds for `prompt` (what `evaluate` passes to `generate`)."""
        return self.tokenizer(prompt, add_special_tokens=self.add_special_tokens)["input_ids"]

    def encode(self, prompt: str, response: str, *, eos: bool = True) -> tuple[list[int], int, bool]:
        """(ids, prompt length, exact) of `prompt + response` (+ EOS): ids[:prompt length] == prompt_ids(prompt).

        The response's ids are those the joint tokenization gives after the prompt's. Where the prompt's last
        token merges with the response's first (a prompt ending mid-word or in a space), the joint ids do not
        start with the prompt's; then the response is the joint tokens that start inside it, and `exact` is
        False.
        """
        prompt_ids = self.prompt_ids(prompt)
        joint = self.tokenizer(prompt + response, add_special_tokens=self.add_special_tokens)["input_ids"]
        exact = joint[: len(prompt_ids)] == prompt_ids
        response_ids = joint[len(prompt_ids) :] if exact else self._response_ids(prompt, response)
        eos_id = self.tokenizer.eos_token_id
        if eos and eos_id is not None and (not response_ids or response_ids[-1] != eos_id):
            response_ids = [*response_ids, eos_id]
        return prompt_ids + response_ids, len(prompt_ids), exact

    def _response_ids(self, prompt: str, response: str) -> list[int]:
        """Ids of the joint tokens whose characters lie in the response (offsets); a token that straddles the
        boundary contributes the ids of its response part. Without offsets: the response tokenized alone."""
        text = prompt + response
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
            return self.tokenizer(response, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if start >= len(prompt):
                ids.append(token)
            elif end > len(prompt):
                ids += self.tokenizer(text[len(prompt) : end], add_special_tokens=False)["input_ids"]
        return ids


def _text(row: dict, key: str, *, blank: bool = True) -> str:
    """The text field `key` of `row` (a number as its text); `blank`: whether an empty text is fine."""
    problem = text_problem(row[key], blank=blank)
    if problem:
        raise BadInputError(f"field '{key}' {problem}", hint="fix or drop the row")
    return str(row[key])
