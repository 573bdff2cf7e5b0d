"""Data sets, formats, sampling, tokenization and padding-aware batching (docs/design.md §3).

Every row a stage reads is checked against its format's schema (lorasb_cli/schema.py): text fields hold text, a
response or the assistant's last turn is not blank, roles are system/user/assistant, and a file holds one kind of
row. Classification labels follow one rule: all strings, all integers or all booleans, as the first row's (a float
label is regression's; null, NaN or a mix such as 1 and "1" is a bad row); class names are the labels' text, in the
labels' order. A bad row is named by its file and row (a .jsonl file's line). `checked` reads rows held in Arrow up
front by their column types; a run that reads every row (train) checks the others before its first step too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import builtin_data, templates
from .errors import BadInputError
from .files import file_sha256
from .registry import did_you_mean
from .rows import CheckedRows, Dataset, JsonLines, RowView, renamed
from .schema import CLASSIFICATION_TEXT_FIELDS, FIELD_PAIRS, MESSAGES, Schema, classification_fields
from .templates import IGNORE

log = logging.getLogger("lorasb")

FORMATS = ("auto", "text", "prompt-response", "classification", "regression")
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Fields `--fields ROLE=COLUMN` can name: the column is read as that role.
FIELD_ROLES = ("prompt", "response", "completion", "input", "text", "label", "messages")
# The one output of a regression head (HF: num_labels == 1 is regression, trained with MSE).
REGRESSION_LABELS = ["score"]


@dataclass(frozen=True)
class Example:
    """One tokenized sample, HF convention: `labels[t]` is `input_ids[t]` where token t is supervised
    (predicted from position t−1) and IGNORE elsewhere; the loss shifts by one. A classification sample has
    `label` (a class id; a float target for regression) instead, and `token_type_ids` where the tokenizer
    gives them (sentence pairs)."""

    input_ids: list[int]
    labels: list[int] | None = None
    label: int | float | None = None
    token_type_ids: list[int] | None = None


def load_dataset_rows(
    data: str,
    split: str = "train",
    config: str | None = None,
    *,
    size: int | None = None,
    seed: int = 0,
    fields: str | None = None,
    roles: Sequence[str] = FIELD_ROLES,
) -> Dataset:
    """Read a built-in data set (`size` rows from `seed`), a local .jsonl/.json/.csv/.parquet file (one
    split), a local data set folder (`save_to_disk`, or a hub-style repo of data files) or a hub data set's
    `split` (of `config`). `fields` ("prompt=COL,response=COL,...") renames columns to the `roles` the
    caller reads. Rows stay in Arrow and are read on access."""
    import datasets

    renames = parse_fields(fields, roles)
    if data in builtin_data.NAMES:
        dataset = builtin_data.load(data, split=split, size=size, seed=seed)
        rows = [renamed(row, renames) for row in dataset.rows] if renames else dataset.rows
        return Dataset(
            rows=rows, source=dataset.source, split=dataset.split, digest=dataset.digest, extra=dataset.extra
        )
    if size is not None:
        raise BadInputError(
            f"--size applies to the built-in data sets ({', '.join(builtin_data.NAMES)})",
            hint="to use part of a file, pass --samples/--frac (estimate) or --limit (evaluate)",
        )

    datasets.disable_progress_bars()
    path = Path(data).expanduser()
    if path.is_dir():
        table = _load_folder(path, config, split)
        source, digest = str(path.resolve()), _table_digest(table)
    elif path.suffix.lower() == ".jsonl" and path.is_file() and path.stat().st_size > 0:
        lines = JsonLines.index(path, renames)
        if not len(lines):
            raise BadInputError("data has no rows", path=str(path), hint="pass a non-empty data set")
        return Dataset(rows=lines, source=str(path.resolve()), split="file", digest=lines.digest)
    elif LOCAL_SUFFIXES.get(path.suffix.lower()) is not None or path.exists():
        table = _load_file(path)
        source, split, digest = str(path.resolve()), "file", _file_digest(path)
    else:
        table = _load_hub(data, config, split)
        source, digest = data, _table_digest(table)
    if table.num_rows == 0:
        raise BadInputError(f"data has no rows (split '{split}')", path=source, hint="pass a non-empty data set")
    if renames:
        table = _rename_columns(table, renames, source)
    extra = {"config": config} if config else {}
    return Dataset(rows=RowView(table), source=source, split=split, digest=digest, extra=extra)


def _load_file(path: Path):
    import datasets

    builder = LOCAL_SUFFIXES.get(path.suffix.lower())
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
        with _quiet_datasets():
            return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        raise BadInputError(
            f"cannot read data file: {_cause(e)}", path=str(path), hint=f"check that it is valid {builder}"
        ) from e


@contextlib.contextmanager
def _quiet_datasets():
    """datasets logs a malformed file's parser error as well as raising it: the error line says it once."""
    import datasets

    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _cause(error: BaseException) -> str:
    """The first line of what went wrong at the root of `error`: datasets wraps a parser's error ("Expected 2
    fields in line 3, saw 4") in one that only says generating the data set failed."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_folder(path: Path, config: str | None, split: str):
    """A folder written by `save_to_disk`, or laid out as a hub data set repo (data files, configs in README)."""
    import datasets

    try:
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise BadInputError(
                        f"data set has no split '{split}'", path=str(path), hint=f"pass --split {' or '.join(table)}"
                    )
                table = table[split]
            return table
        with _quiet_datasets():
            return datasets.load_dataset(str(path), config, split=split)
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(
            f"cannot load data set folder (config {config}, split '{split}'): {_cause(e)}",
            path=str(path),
            hint="check --data-config and --split",
        ) from e


def _load_hub(name: str, config: str | None, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise BadInputError(
            f"cannot load data set '{name}'{f' config {config}' if config else ''} split '{split}': "
            f"{str(e).splitlines()[0]}",
            hint="pass a local file or folder, or check the hub name, --data-config, --split and network",
        ) from e


def parse_fields(spec: str | None, roles: Sequence[str] = FIELD_ROLES) -> dict[str, str]:
    """`--fields prompt=COL,response=COL` → {COL: role}: which column to read as which role."""
    if not spec:
        return {}
    renames: dict[str, str] = {}
    for part in spec.split(","):
        role, sep, column = (x.strip() for x in part.partition("="))
        if not sep or not column or role not in roles:
            raise BadInputError(
                f"--fields '{part.strip()}' is not ROLE=COLUMN with ROLE one of {', '.join(roles)}",
                hint="e.g. --fields prompt=question_text,response=solution",
            )
        renames[column] = role
    return renames


def _rename_columns(table, renames: dict[str, str], source: str):
    missing = [c for c in renames if c not in table.column_names]
    if missing:
        raise BadInputError(
            f"--fields names columns {', '.join(missing)} the data lacks; it has {', '.join(table.column_names)}",
            path=source,
        )
    # A column already named like a role the user mapped elsewhere is not that role: drop it.
    shadowed = [c for c in table.column_names if c in renames.values() and c not in renames]
    return table.remove_columns(shadowed).rename_columns({c: r for c, r in renames.items() if c != r})


def _file_digest(path: Path) -> str:
    return file_sha256(path)[:16]


def _table_digest(table) -> str:
    """sha256 of a `datasets.Dataset`'s rows (its Arrow record batches as IPC streams): equal for the same rows
    wherever the folder or cache lies, unlike `datasets`' own fingerprint, which hashes the data files' paths."""
    import pyarrow as pa

    if table._indices is not None:  # a selection or shuffle: hash the rows it shows, in its order
        table = table.flatten_indices()
    h = hashlib.sha256()
    for batch in table.data.table.to_batches():
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        h.update(sink.getvalue())
    return h.hexdigest()[:16]


def float_labels(rows: Sequence[dict]) -> bool:
    """Whether the rows' `label` is a float (a regression target, e.g. STS-B's 0–5 similarity)."""
    return "label" in rows[0] and isinstance(rows[0]["label"], float)


def detect_format(columns: Sequence[str], requested: str, source: str = "", *, floats: bool = False) -> str:
    """Check that the rows carry the fields `requested` needs; `auto` picks a format from the fields (and
    `floats`: whether the labels are float, see `float_labels`)."""
    cols = set(columns)
    text_fields = any(set(f) <= cols for f in CLASSIFICATION_TEXT_FIELDS)
    has = {
        "prompt-response": MESSAGES in cols or any(set(p) <= cols for p, _ in FIELD_PAIRS),
        "regression": "label" in cols and text_fields and floats,
        "classification": "label" in cols and text_fields,
        "text": "text" in cols,
    }
    needs = {
        "prompt-response": " or ".join("/".join(p) for p, _ in FIELD_PAIRS) + " or messages",
        "classification": "label plus text (or sentence, sentence1/sentence2, premise/hypothesis)",
        "regression": "a float label plus text (or sentence, sentence1/sentence2, premise/hypothesis)",
        "text": "text",
    }
    if requested not in FORMATS:
        raise BadInputError(f"unknown --format '{requested}'", hint=did_you_mean(requested, FORMATS))
    if requested == "auto":
        for fmt in ("prompt-response", "regression", "classification", "text"):
            if has[fmt]:
                log.info("--format auto: picked %s from the fields %s", fmt, ", ".join(sorted(cols)))
                return fmt
        raise BadInputError(
            f"cannot tell the data format from the fields {', '.join(sorted(cols))}",
            path=source,
            hint=f"rows need {needs['prompt-response']}, text, or label plus text; or name them with --fields",
        )
    if not has[requested]:
        raise BadInputError(
            f"--format {requested} needs the fields {needs[requested]}; the data has {', '.join(sorted(cols))}",
            path=source,
            hint="rename the fields with --fields ROLE=COLUMN or pick another --format",
        )
    return requested


# A run that reads every row checks up to this many rows not held in Arrow (a .jsonl file: 10–25 µs a row, so at
# most about 10 s) before its first step; a larger file's rows are checked as they are read.
UP_FRONT_ROWS = 500_000


def checked(dataset: Dataset, fmt: str, *, every_row: bool = True) -> Dataset:
    """`dataset` whose rows are checked against `fmt`'s schema as they are read (schema.py; the schema is the first
    row's). Rows held in Arrow are checked now: their column types and one vectorized pass find the rows that may
    be bad, and only those are read. With `every_row` (a run that reads them all, such as train) other rows, up to
    UP_FRONT_ROWS, are read now as well, so that a bad row stops the run before its first step."""
    rows = CheckedRows(dataset.rows, Schema.of(fmt, dataset.rows[0], dataset.source), dataset.source)
    table = dataset.rows.arrow() if isinstance(dataset.rows, RowView) else None
    if table is not None:
        # datasets stores a column of values of several types as JSON text, and decodes each as it is read
        mixed = set(dataset.rows.json_columns()) & set(rows.schema.columns)
        if fmt == "classification" and "label" in mixed:  # decoding "1" gives 1: the types are lost already
            raise BadInputError(
                'the labels mix types (such as 1, "1" and true)',
                path=dataset.source,
                hint="make every label a string, every label an integer or every label a boolean",
            )
        rows.check(range(len(rows)) if mixed else rows.schema.suspects(table).tolist())
    elif every_row and len(rows) <= UP_FRONT_ROWS:
        rows.check()
    elif every_row:
        log.info("%s rows: each is checked as it is read (a bad one stops the run there)", f"{len(rows):,}")
    return dataclasses.replace(dataset, rows=rows)


def sample_count(population: int, *, frac: float | None, samples: int | None, min_samples: int = 1) -> tuple[int, str]:
    """(rows a sample draws, why): exactly `samples`; or `frac` of the rows rounded up, raised to `min_samples`
    (never past every row), since a fraction of a small file can be a single sample; or every row."""
    if frac is not None and samples is not None:
        raise BadInputError("pass either --frac or --samples, not both")
    if samples is not None:
        if samples <= 0:
            raise BadInputError(f"--samples {samples} must be positive")
        if samples > population:
            raise BadInputError(
                f"--samples {samples} is larger than the split ({population} rows)",
                hint=f"pass --samples {population} or less, or --frac",
            )
        return samples, "--samples"
    if frac is None:
        return population, "every row"
    if not 0 < frac <= 1:
        raise BadInputError(f"--frac {frac} is outside (0, 1]", hint="pass a fraction such as 0.001")
    if min_samples < 1:
        raise BadInputError(f"--min-samples {min_samples} must be positive")
    share = max(1, math.ceil(frac * population))
    floor = min(min_samples, population)
    if share >= floor:
        return share, f"--frac {frac:g} of {population:,} rows"
    everything = " (every row)" if floor == population else ""
    return (
        floor,
        f"--frac {frac:g} of {population:,} rows is {share}, raised to --min-samples {min_samples}{everything}",
    )


def sample_indices(
    population: int, *, frac: float | None, samples: int | None, seed: int, min_samples: int = 1
) -> list[int]:
    """Indices of a random sample of `sample_count` rows; the same seed draws the same rows, and a larger count
    draws the smaller one's rows first."""
    count, _ = sample_count(population, frac=frac, samples=samples, min_samples=min_samples)
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


def head_labels(fmt: str, rows: Sequence[dict]) -> list[str] | None:
    """The outputs of the head a format trains: class names (the labels' text, in the labels' order: class id i is
    `labels[i]`; `rows` are checked, so their labels have one type) for `classification`, the one score of
    `regression`, None for a language-model format."""
    if fmt == "regression":
        return list(REGRESSION_LABELS)
    if fmt != "classification":
        return None
    values = rows.column("label") if isinstance(rows, (RowView, JsonLines, CheckedRows)) else [r["label"] for r in rows]
    return [str(value) for value in sorted(set(values))]  # one type per file (schema.py): sorted by value


def check_labels(rows: Sequence[dict], fmt: str, labels: Sequence[str] | None, source: str = "") -> None:
    """Refuse classification rows whose labels the head does not have (checked up front: rows are encoded
    lazily, and a bad label would otherwise stop training midway)."""
    if fmt != "classification" or labels is None:
        return
    unknown = sorted(set(head_labels(fmt, rows)) - set(labels))
    if unknown:
        raise BadInputError(
            f"labels {', '.join(unknown[:5])} are not among the model's classes {', '.join(labels)}",
            path=source,
            hint="train and estimate on data with the same label set",
        )


def classification_text(row: dict) -> str | tuple[str, str]:
    """The text, or the (first, second) pair, of a classification row; pairs are checked first."""
    fields = classification_fields(row)
    if fields is not None:
        return str(row[fields[0]]) if len(fields) == 1 else (str(row[fields[0]]), str(row[fields[1]]))
    raise BadInputError(
        f"classification row has no text fields: {sorted(row)}",
        hint="name them text, sentence, sentence1/sentence2, premise/hypothesis or question/sentence",
    )


def check_max_length(max_length: int) -> None:
    """A sample needs a prompt token and a supervised one (causal LM) or [CLS] and [SEP] (encoder)."""
    if max_length < 2:
        raise BadInputError(f"--max-length {max_length} is too small", hint="pass at least 2")


@dataclass(frozen=True)
class Encoder:
    """Turns one row into an Example: `text` (every next token supervised), `prompt-response` (the template's
    prompt + response tokenized jointly, loss on the response and EOS), `classification` (class ids of
    `labels`) or `regression` (the float label)."""

    fmt: str
    tokenizer: object
    max_length: int
    labels: Sequence[str] | None = None
    template: str | None = None  # prompt-response only (templates.Template: None is the default template)
    system_prompt: str | None = None  # chat: the system turn of rows without one (templates.system_prompt)

    def __post_init__(self):
        check_max_length(self.max_length)
        if self.fmt in ("classification", "regression") and self.labels is None:
            raise BadInputError(f"--format {self.fmt} needs a sequence-classification model with its outputs")

    @functools.cached_property
    def _template(self) -> templates.Template:
        return templates.Template(self.template, self.tokenizer, self.system_prompt)

    def __call__(self, row: dict) -> Example:
        if self.fmt == "text":
            ids = self.tokenizer(str(row["text"]), truncation=True, max_length=self.max_length)["input_ids"]
            return Example(input_ids=ids, labels=list(ids))
        if self.fmt == "prompt-response":
            ids, prompt_length, _ = self._template.encode(*self._template.split(row))
            labels = [IGNORE] * prompt_length + ids[prompt_length:]
            return Example(input_ids=ids[: self.max_length], labels=labels[: self.max_length])
        label, text = self._label(row["label"]), classification_text(row)
        encoded = self.tokenizer(
            *((text,) if isinstance(text, str) else text), truncation=True, max_length=self.max_length
        )
        return Example(input_ids=encoded["input_ids"], label=label, token_type_ids=encoded.get("token_type_ids"))

    @functools.cached_property
    def _class_ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels or ())}

    def _label(self, value) -> int | float:
        if self.fmt == "regression":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadInputError(f"--format regression needs numeric labels, got {value!r}")
            return float(value)
        if str(value) not in self._class_ids:
            raise BadInputError(
                f"label {value} is not among the model's classes {', '.join(self.labels)}",
                hint="train and estimate on data with the same label set",
            )
        return self._class_ids[str(value)]


class LazyExamples(Sequence):
    """Rows encoded on access (what the Trainer's data loader reads): nothing is tokenized up front."""

    def __init__(self, rows: Sequence[dict], encoder: Encoder):
        self.rows, self.encoder = rows, encoder

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyExamples(self.rows[index], self.encoder)
        return self.encoder(self.rows[index])


def encode(
    rows: Sequence[dict],
    fmt: str,
    tokenizer,
    max_length: int,
    labels: Sequence[str] | None = None,
    template: str | None = None,
    system_prompt: str | None = None,
) -> list[Example]:
    """Tokenize rows now (see `Encoder`); warns about samples that add nothing within `max_length`."""
    encoder = Encoder(fmt, tokenizer, max_length, labels, template, system_prompt)
    examples = [encoder(row) for row in rows]
    unsupervised = sum(1 for e in examples if supervised_tokens(e) == 0)
    if unsupervised:
        log.warning(
            "%d of %d samples have no supervised token within --max-length %d; they add nothing",
            unsupervised,
            len(examples),
            max_length,
        )
    return examples


def check_supervised(tokens: int, what: str, max_length: int) -> None:
    """Refuse data that teaches nothing: `what` (e.g. "the 32 samples drawn") holds `tokens` supervised tokens."""
    if tokens == 0:
        raise BadInputError(
            f"{what} have no supervised token within --max-length {max_length}: there is nothing to learn",
            hint="raise --max-length, or check that the rows' responses are not empty",
        )


def supervised_tokens(example: Example) -> int:
    """Positions with a next-token target (labels shift by one in the loss); every token of a classifier's input."""
    if example.label is not None:
        return len(example.input_ids)
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: `input_ids`, `attention_mask` [batch, longest], `labels` (token
    labels [batch, longest], class ids [batch], or float targets [batch]) and `token_type_ids` when the examples
    have them."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention_mask[row, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if examples[0].label is not None:
        dtype = torch.float32 if isinstance(examples[0].label, float) else torch.long
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=dtype)
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
