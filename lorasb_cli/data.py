"""Data sets, formats, sampling, tokenization and padding-aware batching (DESIGN.md §3)."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInputError

log = logging.getLogger("lorasb")

IGNORE = -100  # label of positions that carry no loss (prompt, padding)

FORMATS = ("auto", "text", "prompt-response", "classification")
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# Field pairs `prompt-response` recognizes, in the order `auto` tries them.
PROMPT_RESPONSE_FIELDS = (
    ("query", "response"),  # MetaMathQA
    ("question", "answer"),  # GSM8K
    ("instruction", "output"),  # Alpaca (optional `input`)
    ("prompt", "completion"),
)
CLASSIFICATION_TEXT_FIELDS = (
    ("text",),
    ("sentence",),
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
)

# The Alpaca template MetaMathQA and the LoRA-SB reference train with; `evaluate` prompts with it too.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Dataset:
    """Rows of one split and where they came from; `digest` identifies the content for provenance."""

    rows: list[dict]
    source: str
    split: str
    digest: str
    extra: dict = field(default_factory=dict)  # a built-in set's package, version, generator and seed

    def provenance(self) -> dict:
        return {"source": self.source, "split": self.split, "rows": len(self.rows), "digest": self.digest,
                **self.extra}  # fmt: skip


@dataclass(frozen=True)
class Example:
    """One tokenized sample, HF convention: `labels[t]` is `input_ids[t]` where token t is supervised
    (predicted from position t−1) and IGNORE elsewhere; the loss shifts by one. A classification sample has
    `label` (a class id) instead, and `token_type_ids` where the tokenizer gives them (sentence pairs)."""

    input_ids: list[int]
    labels: list[int] | None = None
    label: int | None = None
    token_type_ids: list[int] | None = None


def load_dataset_rows(
    data: str, split: str = "train", config: str | None = None, *, size: int | None = None, seed: int = 0
) -> Dataset:
    """Read a built-in data set (`size` rows from `seed`), a local .jsonl/.json/.csv/.parquet file (one
    split) or a hub data set's `split` (of `config`)."""
    import datasets

    from . import builtin_data

    if data in builtin_data.NAMES:
        return builtin_data.load(data, split=split, size=size, seed=seed)
    if size is not None:
        raise BadInputError(
            f"--size applies to the built-in data sets ({', '.join(builtin_data.NAMES)})",
            hint="to use part of a file, pass --samples/--frac (estimate) or --limit (evaluate)",
        )

    datasets.disable_progress_bars()
    path = Path(data).expanduser()
    builder = LOCAL_SUFFIXES.get(path.suffix.lower())
    if builder is not None or path.exists():
        if not path.is_file():
            raise BadInputError("data file not found", path=str(path), hint="check the path passed to --data")
        if builder is None:
            raise BadInputError(
                f"unsupported data file type '{path.suffix}'",
                path=str(path),
                hint=f"use one of {', '.join(LOCAL_SUFFIXES)}",
            )
        if path.stat().st_size == 0:
            raise BadInputError("data file is empty", path=str(path), hint="pass a file with at least one row")
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types for malformed files
            raise BadInputError(
                f"cannot read data file: {str(e).splitlines()[0]}",
                path=str(path),
                hint=f"check that it is valid {builder}",
            ) from e
        digest = _file_digest(path)
        source, split = str(path.resolve()), "file"
    else:
        try:
            table = datasets.load_dataset(data, config, split=split)
        except Exception as e:
            raise BadInputError(
                f"cannot load data set '{data}' split '{split}': {str(e).splitlines()[0]}",
                hint="pass a local .jsonl/.json/.csv/.parquet file, or check the hub name, split and network",
            ) from e
        digest = getattr(table, "_fingerprint", "") or ""
        source = data
    rows = table.to_list()
    if not rows:
        raise BadInputError(f"data has no rows (split '{split}')", path=source, hint="pass a non-empty data set")
    return Dataset(rows=rows, source=source, split=split, digest=digest)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def detect_format(columns: Sequence[str], requested: str, source: str = "") -> str:
    """Check that the rows carry the fields `requested` needs; `auto` picks a format from the fields."""
    cols = set(columns)
    has = {
        "prompt-response": any(set(pair) <= cols for pair in PROMPT_RESPONSE_FIELDS),
        "classification": "label" in cols and any(set(f) <= cols for f in CLASSIFICATION_TEXT_FIELDS),
        "text": "text" in cols,
    }
    needs = {
        "prompt-response": " or ".join("/".join(p) for p in PROMPT_RESPONSE_FIELDS),
        "classification": "label plus text (or sentence, sentence1/sentence2, premise/hypothesis)",
        "text": "text",
    }
    if requested not in FORMATS:
        from .models import did_you_mean

        raise BadInputError(f"unknown --format '{requested}'", hint=did_you_mean(requested, list(FORMATS)))
    if requested == "auto":
        for fmt in ("prompt-response", "classification", "text"):
            if has[fmt]:
                log.info("--format auto: picked %s from the fields %s", fmt, ", ".join(sorted(cols)))
                return fmt
        raise BadInputError(
            f"cannot tell the data format from the fields {', '.join(sorted(cols))}",
            path=source,
            hint=f"rows need {needs['prompt-response']}, text, or label plus text",
        )
    if not has[requested]:
        raise BadInputError(
            f"--format {requested} needs the fields {needs[requested]}; the data has {', '.join(sorted(cols))}",
            path=source,
            hint="rename the fields or pick another --format",
        )
    return requested


def split_prompt_response(row: dict) -> tuple[str, str]:
    """(prompt rendered with the Alpaca template, response) of a prompt-response row."""
    for prompt_key, response_key in PROMPT_RESPONSE_FIELDS:
        if prompt_key in row and response_key in row:
            instruction, response = str(row[prompt_key]), str(row[response_key])
            extra = row.get("input") if prompt_key == "instruction" else None
            if extra:
                return PROMPT_WITH_INPUT_TEMPLATE.format(instruction=instruction, input=extra), response
            return PROMPT_TEMPLATE.format(instruction=instruction), response
    raise BadInputError(f"row lacks prompt/response fields: {sorted(row)}")


def sample_indices(population: int, *, frac: float | None, samples: int | None, seed: int) -> list[int]:
    """Indices of a random sample: `frac` of the rows rounded up (at least 1), or exactly `samples` rows."""
    if frac is not None and samples is not None:
        raise BadInputError("pass either --frac or --samples, not both")
    if frac is not None:
        if not 0 < frac <= 1:
            raise BadInputError(f"--frac {frac} is outside (0, 1]", hint="pass a fraction such as 0.001")
        count = max(1, math.ceil(frac * population))
    elif samples is not None:
        if samples <= 0:
            raise BadInputError(f"--samples {samples} must be positive")
        if samples > population:
            raise BadInputError(
                f"--samples {samples} is larger than the split ({population} rows)",
                hint=f"pass --samples {population} or less, or --frac",
            )
        count = samples
    else:
        count = population
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(population, generator=generator)[:count].tolist()


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """`--shard i/N` (0-based i) → (i, N)."""
    if shard is None:
        return None
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise BadInputError(f"--shard '{shard}' is not i/N", hint="pass e.g. --shard 0/4 (i counts from 0)") from None
    if count < 1 or not 0 <= index < count:
        raise BadInputError(f"--shard {shard}: i must be in 0..{count - 1}", hint="i counts from 0, as ranks do")
    return index, count


def take_shard(indices: list[int], index: int, count: int) -> list[int]:
    """The `index`-th of `count` contiguous, disjoint, near-equal parts of `indices`."""
    parts = torch.tensor_split(torch.tensor(indices, dtype=torch.long), count)
    return parts[index].tolist()


def classification_labels(rows: Sequence[dict]) -> list[str]:
    """The class names of classification rows, sorted: class id i is `labels[i]`."""
    return sorted({str(row["label"]) for row in rows})


def classification_text(row: dict) -> str | tuple[str, str]:
    """The text, or the (first, second) pair, of a classification row; pairs are checked first."""
    for fields in sorted(CLASSIFICATION_TEXT_FIELDS, key=len, reverse=True):
        if all(f in row for f in fields):
            return str(row[fields[0]]) if len(fields) == 1 else (str(row[fields[0]]), str(row[fields[1]]))
    raise BadInputError(
        f"classification row has no text fields: {sorted(row)}",
        hint="name them text, sentence, sentence1/sentence2, premise/hypothesis or question/sentence",
    )


def encode(
    rows: Sequence[dict], fmt: str, tokenizer, max_length: int, labels: Sequence[str] | None = None
) -> list[Example]:
    """Tokenize rows for a causal LM loss, or for a classifier (`classification`, with the class names).

    `text`: `tokenizer(text)` with its defaults, truncated, every next token supervised.
    `prompt-response`: prompt ids (with the tokenizer's special tokens) + response ids + EOS; loss on the
    response only. Ids are concatenated rather than re-tokenized so the prompt/response boundary is exact.
    """
    if max_length < 2:
        raise BadInputError(f"--max-length {max_length} is too small", hint="pass at least 2")
    if fmt == "classification":
        return _encode_classification(rows, tokenizer, max_length, labels)
    examples = []
    for row in rows:
        if fmt == "text":
            ids = tokenizer(str(row["text"]), truncation=True, max_length=max_length)["input_ids"]
            examples.append(Example(input_ids=ids, labels=list(ids)))
        else:
            prompt, response = split_prompt_response(row)
            prompt_ids = tokenizer(prompt)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = (prompt_ids + response_ids)[:max_length]
            labels_ = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
            examples.append(Example(input_ids=ids, labels=labels_))
    unsupervised = sum(1 for e in examples if supervised_tokens(e) == 0)
    if unsupervised:
        log.warning(
            "%d of %d samples have no supervised token within --max-length %d; they add nothing",
            unsupervised,
            len(examples),
            max_length,
        )
    return examples


def _encode_classification(rows, tokenizer, max_length: int, labels: Sequence[str] | None) -> list[Example]:
    if labels is None:
        raise BadInputError("--format classification needs a sequence-classification model with class names")
    ids = {name: i for i, name in enumerate(labels)}
    unknown = sorted({str(row["label"]) for row in rows} - set(ids))
    if unknown:
        raise BadInputError(
            f"labels {', '.join(unknown[:5])} are not among the model's classes {', '.join(labels)}",
            hint="train and estimate on data with the same label set",
        )
    examples = []
    for row in rows:
        text = classification_text(row)
        pair = (text,) if isinstance(text, str) else text
        encoded = tokenizer(*pair, truncation=True, max_length=max_length)
        examples.append(
            Example(input_ids=encoded["input_ids"], label=ids[str(row["label"])],
                    token_type_ids=encoded.get("token_type_ids"))
        )  # fmt: skip
    return examples


def supervised_tokens(example: Example) -> int:
    """Positions with a next-token target (labels shift by one in the loss); every token of a classifier's input."""
    if example.label is not None:
        return len(example.input_ids)
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: `input_ids`, `attention_mask` [batch, longest], `labels` (token
    labels [batch, longest], or class ids [batch]) and `token_type_ids` when the examples have them."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if examples[0].label is not None:
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        batch["labels"] = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(examples):
            batch["labels"][row, : len(e.labels)] = torch.tensor(e.labels)
    if examples[0].token_type_ids is not None:
        batch["token_type_ids"] = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            batch["token_type_ids"][row, : len(e.token_type_ids)] = torch.tensor(e.token_type_ids)
    return batch


def make_batches(
    examples: Sequence[Example], batch_size: int, pad_id: int, *, sort_by_length: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `collate`; sorting by length first keeps padding (and wasted compute) small."""
    if batch_size < 1:
        raise BadInputError(f"--batch-size {batch_size} must be positive")
    order = list(range(len(examples)))
    if sort_by_length:
        order.sort(key=lambda i: -len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)
