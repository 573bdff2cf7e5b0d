"""What a row of each data format holds (docs/design.md §3): one schema per `--format`, checked on every row a stage
reads, so that a bad row is refused with its file and row named instead of being trained as "None" or a repr.

A file holds one kind of row: its first row picks the fields its format reads (the prompt-response pair or
`messages`; the classification text fields) and the type of its labels, and every row must have the same.

- A text field holds a string; a finite number is read as its decimal text (a CSV column of numbers). Null, NaN,
  Inf, a boolean, a list or an object is a bad row.
- text: `text` is not blank.
- prompt-response: the response is not blank (the prompt may be); alpaca's `input` is text or null. `messages` is
  a non-empty list of {role, content} objects with role system, user or assistant and text content; the last is
  the assistant's turn, the one trained on, and is not blank.
- classification: every label is a string, every label an integer, or every label a boolean: the first row's type
  (a float label is regression's). Null, NaN and a mix such as 1 and "1" are bad rows. A class is named by its
  label's text (1 → "1", true → "True"); the classes are in the labels' order (integers by value, strings
  alphabetically, false before true) and class id i is the i-th.
- regression: the label is a finite number, not a boolean.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .errors import BadInputError

# (prompt field, response field) pairs a prompt-response row may carry, in the order they are tried; the
# `--template auto` each implies: TRL's prompt/completion type is `plain`, instruction styles are `alpaca`.
FIELD_PAIRS = (
    (("query", "response"), "alpaca"),  # MetaMathQA
    (("question", "answer"), "alpaca"),  # GSM8K
    (("instruction", "output"), "alpaca"),  # Alpaca, CommonSense170K (optional `input`)
    (("prompt", "completion"), "plain"),  # OpenAI / TRL prompt-completion
    (("prompt", "response"), "plain"),  # what `--fields prompt=COL,response=COL` names: plain pairs, as TRL's
)
MESSAGES = "messages"  # TRL's conversational rows: [{"role": ..., "content": ...}, ...]
ROLES = ("system", "user", "assistant")
# The text fields of a classification row; a pair is tried before a single field.
CLASSIFICATION_TEXT_FIELDS = (
    ("text",),
    ("sentence",),
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
)
# The types a classification label may have, each named as the rule names it; a float label is regression's.
LABEL_TYPES = {str: "strings", int: "integers", bool: "booleans"}

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlevel, _short.maxlist, _short.maxdict = 40, 40, 2, 4, 4


def shown(value) -> str:
    """`value` for an error line: short however long or deeply nested it is."""
    return _short.repr(value)


def _kind(value) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "a list"}
    return names.get(type(value), "an object" if isinstance(value, Mapping) else type(value).__name__)


def _non_finite(value: float) -> str:
    return "NaN" if math.isnan(value) else "Inf" if value > 0 else "-Inf"


def text_problem(value, *, blank: bool = True) -> str | None:
    """What is wrong with `value` as a text field (a string, or a finite number read as its text), or None.
    `blank`: whether an empty or all-space text is fine."""
    if isinstance(value, str):
        return None if blank or value.strip() else "is empty"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if math.isfinite(value) else f"is {_non_finite(value)}"
    return "is null" if value is None else f"must be text, not {_kind(value)} ({shown(value)})"


def messages_problem(messages) -> str | None:
    """What is wrong with a conversation (`messages`) to train on its last turn, or None."""
    if not isinstance(messages, list) or not messages:
        return f"'{MESSAGES}' must be a non-empty list of {{role, content}} objects, not {shown(messages)}"
    for i, message in enumerate(messages):
        where = f"{MESSAGES}[{i}]"
        if not isinstance(message, Mapping):
            return f"{where} must be a {{role, content}} object, not {_kind(message)} ({shown(message)})"
        role = message.get("role")
        if role not in ROLES:
            has = "has no role" if role is None else f"has the role {shown(role)}"
            return f"{where} {has}: roles are {', '.join(ROLES)}"
        problem = text_problem(message.get("content"))
        if problem:
            return f"{where}'s content {problem}"
    if messages[-1]["role"] != "assistant":
        return f"the last of the '{MESSAGES}' must be the assistant's turn, the one trained on"
    if not str(messages[-1]["content"]).strip():
        return f"the assistant's last turn ({MESSAGES}[{len(messages) - 1}]) is empty"
    return None


def label_problem(value, kind: type) -> str | None:
    """What is wrong with `value` as a classification label of a file whose labels are of type `kind`, or None."""
    if type(value) is kind and kind in LABEL_TYPES:
        return None
    if value is None:
        return "label is null"
    if kind not in LABEL_TYPES:
        return (
            f"label {shown(value)} is {_kind(value)}: classification labels are strings, integers or booleans "
            "(pass --format regression for scores)"
        )
    return f"label {shown(value)} is {_kind(value)}, but this file's labels are {LABEL_TYPES[kind]}, as its first row's"


def score_problem(value) -> str | None:
    """What is wrong with `value` as a regression label (a finite number), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "label is null" if value is None else f"label must be a number, not {_kind(value)} ({shown(value)})"
    return None if math.isfinite(value) else f"label is {_non_finite(value)}"


def prompt_response_fields(row: Mapping) -> tuple[str, ...] | None:
    """The fields a prompt-response row is read from: ("messages",), or the first of FIELD_PAIRS it has."""
    if MESSAGES in row:
        return (MESSAGES,)
    return next((pair for pair, _ in FIELD_PAIRS if all(f in row for f in pair)), None)


def classification_fields(row: Mapping) -> tuple[str, ...] | None:
    """The text field(s) of a classification row: the first of CLASSIFICATION_TEXT_FIELDS it has, pairs first."""
    ordered = sorted(CLASSIFICATION_TEXT_FIELDS, key=len, reverse=True)
    return next((fields for fields in ordered if all(f in row for f in fields)), None)


@dataclass(frozen=True)
class Schema:
    """The fields `fmt` reads from every row of one file, as its first row has them (`Schema.of`)."""

    fmt: str
    fields: tuple[str, ...]  # the kind of row: ("text",), a prompt-response pair, ("messages",), classification texts
    label: type | None = None  # classification: the first row's label type; None for formats without a class label

    @classmethod
    def of(cls, fmt: str, first: Mapping, source: str = "") -> Schema:
        """The schema of a `fmt` file whose first row is `first` (from `source`)."""
        fields = cls._fields_of(fmt, first) if isinstance(first, Mapping) else None
        if fields is None or (fmt in ("classification", "regression") and "label" not in first):
            has = ", ".join(sorted(first)) if isinstance(first, Mapping) else shown(first)
            raise BadInputError(
                f"--format {fmt}: the first row lacks the fields it reads; it has {has}",
                path=source,
                hint="pass data of the training format, or name its fields with --fields ROLE=COLUMN",
            )
        return cls(fmt, fields, type(first.get("label")) if fmt == "classification" else None)

    @staticmethod
    def _fields_of(fmt: str, row: Mapping) -> tuple[str, ...] | None:
        if fmt == "text":
            return ("text",) if "text" in row else None
        if fmt == "prompt-response":
            return prompt_response_fields(row)
        return classification_fields(row)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every field the format reads: the kind's, alpaca's optional `input`, the label."""
        optional = ("input",) if self.fields[0] == "instruction" else ()
        return (*self.fields, *optional, *(("label",) if self.fmt in ("classification", "regression") else ()))

    @property
    def response(self) -> str | None:
        """The text field trained on (not blank): text's `text`, a pair's response; None for the others."""
        if self.fmt == "text" or (self.fmt == "prompt-response" and self.fields != (MESSAGES,)):
            return self.fields[-1]
        return None

    def problem(self, row) -> str | None:
        """What is wrong with `row` under this schema, or None."""
        if not isinstance(row, Mapping):
            return f"is {_kind(row)}, not an object"
        missing = [f for f in self.columns if f not in row and f != "input"]
        if missing:
            return (
                f"lacks the field{'s' if len(missing) > 1 else ''} {', '.join(missing)} that its file's first row has: "
                "a file holds one kind of row"
            )
        fields = self._fields_of(self.fmt, row)  # the kind the row is read as: another when it has an earlier one
        if fields != self.fields:
            return f"has the fields {'/'.join(fields)} as well as {'/'.join(self.fields)}: a file holds one kind of row"
        if self.fields == (MESSAGES,):
            return messages_problem(row[MESSAGES])
        for name in self.fields:
            problem = text_problem(row[name], blank=name != self.response)
            if problem:
                return f"field '{name}' {problem}"
        if self.fields[0] == "instruction" and row.get("input") is not None:
            problem = text_problem(row["input"])
            if problem:
                return f"field 'input' {problem}"
        if self.fmt == "classification":
            return label_problem(row["label"], self.label)
        if self.fmt == "regression":
            return score_problem(row["label"])
        return None

    def suspects(self, table) -> np.ndarray:
        """Ascending indices of the rows of an Arrow table (`pyarrow.Table`) that may break the schema: a superset
        of the bad rows, found from the column types and one vectorized pass per field, so that only these need
        `problem`. A column of a type no field may have makes every row a suspect."""
        if self.fields == (MESSAGES,):
            masks = [_messages_mask(table.column(MESSAGES))]
        else:
            masks = [_text_mask(table.column(name), blank=name != self.response) for name in self.fields]
        if self.fields[0] == "instruction" and "input" in table.column_names:
            masks.append(_text_mask(table.column("input"), blank=True, null=True))
        if self.fmt in ("classification", "regression"):
            masks.append(_label_mask(table.column("label"), self.label if self.fmt == "classification" else None))
        return np.flatnonzero(np.logical_or.reduce(masks))


def _per_chunk(column, mask_of) -> np.ndarray:
    """`mask_of(chunk)` (a pyarrow boolean array; null counts as suspect) of every chunk, as one numpy mask."""
    import pyarrow.compute as pc

    parts = [pc.fill_null(mask_of(chunk), True).to_numpy(zero_copy_only=False) for chunk in column.chunks]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def _text_mask(column, *, blank: bool, null: bool = False) -> np.ndarray:
    """Rows whose value may be no text: null (unless `null`), NaN or Inf, blank (unless `blank`), or of a type no
    text has (every such row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    strings = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    if pa.types.is_floating(kind):  # pc.is_finite is null where the value is
        return _per_chunk(column, lambda chunk: pc.fill_null(pc.invert(pc.is_finite(chunk)), not null))
    if strings and not blank:  # null where the value is: a suspect
        return _per_chunk(column, lambda chunk: pc.or_(pc.equal(pc.utf8_length(chunk), 0), pc.utf8_is_space(chunk)))
    if strings or pa.types.is_integer(kind) or pa.types.is_null(kind):
        return np.zeros(len(column), dtype=bool) if null else _per_chunk(column, pc.is_null)
    return _per_chunk(column, pc.is_valid) if null else np.ones(len(column), dtype=bool)


def _messages_mask(column) -> np.ndarray:
    """Rows whose `messages` may not be a trainable conversation (see `messages_problem`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    item = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else None
    strings = (pa.string(), pa.large_string())
    if item is None or not pa.types.is_struct(item):
        return np.ones(len(column), dtype=bool)
    names = {item.field(i).name: item.field(i).type for i in range(item.num_fields)}
    if names.get("role") not in strings or names.get("content") not in strings:
        return np.ones(len(column), dtype=bool)
    parts = []
    for chunk in column.chunks:
        lengths = pc.fill_null(pc.list_value_length(chunk), 0).to_numpy(zero_copy_only=False)
        bad = lengths == 0  # a null or empty list
        flat = chunk.flatten()  # the messages of the chunk's rows, in order (null lists hold none)
        role, content = flat.field("role"), flat.field("content")
        message_bad = pc.or_(pc.is_null(flat), pc.is_null(content))
        message_bad = pc.or_(message_bad, pc.invert(pc.fill_null(pc.is_in(role, pa.array(ROLES)), False)))
        row_of = np.repeat(np.arange(len(chunk)), lengths)
        bad[row_of[pc.fill_null(message_bad, True).to_numpy(zero_copy_only=False)]] = True
        last = np.cumsum(lengths)[lengths > 0] - 1
        last_role, last_content = role.take(pa.array(last)), content.take(pa.array(last))
        blank = pc.or_(pc.equal(pc.utf8_length(last_content), 0), pc.utf8_is_space(last_content))
        last_bad = pc.or_(pc.invert(pc.equal(last_role, "assistant")), blank)
        bad[np.flatnonzero(lengths > 0)[pc.fill_null(last_bad, True).to_numpy(zero_copy_only=False)]] = True
        parts.append(bad)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def _label_mask(column, label: type | None) -> np.ndarray:
    """Rows whose label may break the rule: `label` is a classification file's label type, None for regression's
    finite numbers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    fits = {
        str: pa.types.is_string(kind) or pa.types.is_large_string(kind),
        int: pa.types.is_integer(kind),
        bool: pa.types.is_boolean(kind),
        None: pa.types.is_integer(kind) or pa.types.is_floating(kind),
    }.get(label, False)
    if not fits:
        return np.ones(len(column), dtype=bool)
    if pa.types.is_floating(kind):
        return _per_chunk(column, lambda chunk: pc.invert(pc.is_finite(chunk)))
    return _per_chunk(column, pc.is_null)
