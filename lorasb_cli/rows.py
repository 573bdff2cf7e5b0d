"""How rows are held: an Arrow table read on access, a .jsonl file indexed by line offset, rows checked against
their format's schema as they are read, and `Dataset`, the rows of one split with where they came from."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInputError
from .schema import Schema


class RowView(Sequence):
    """Rows of an Arrow-backed `datasets.Dataset`, read on access: a 400K-row corpus is never a Python list."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return RowView(self.table.select(range(len(self))[index]))
        return self.table[int(index)]

    def __iter__(self):
        return iter(self.table)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def column(self, name: str) -> list:
        return self.table[name]

    def arrow(self):
        """The rows as one `pyarrow.Table` (memory-mapped, not copied); None for a selection of another table's."""
        return self.table.data.table if self.table._indices is None else None

    def json_columns(self) -> list[str]:
        """Columns `datasets` holds as JSON text (their values had several types) and decodes as they are read."""
        import datasets

        return [name for name, feature in self.table.features.items() if isinstance(feature, datasets.Json)]


class JsonLines(Sequence):
    """Rows of a .jsonl file, parsed on access. One pass over the file records where each row starts (and hashes
    it); drawing 400 rows of a 400K-row file then reads those 400 lines. (Converting it to Arrow first would
    cost a copy of the file and, at each randomly read row, the mapped pages around it: 1.3–1.4× the memory.)"""

    def __init__(self, path: Path, offsets: torch.Tensor, renames: dict[str, str], digest: str):
        self.path, self.offsets, self.renames, self.digest = path, offsets, renames, digest

    @classmethod
    def index(cls, path: Path, renames: dict[str, str]) -> JsonLines:
        h, offsets, position = hashlib.sha256(), [], 0
        with path.open("rb") as f:
            for line in f:
                h.update(line)
                if line.strip():
                    offsets.append(position)
                position += len(line)
        lines = cls(path, torch.tensor(offsets, dtype=torch.int64), renames, h.hexdigest()[:16])
        if len(lines):
            lines[0]  # a file that is not JSON lines fails here, not at the first drawn row
        return lines

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return JsonLines(self.path, self.offsets[index], self.renames, self.digest)
        with self.path.open("rb") as f:
            f.seek(int(self.offsets[index]))
            return self._parse(f.readline(), index)

    def __iter__(self):
        with self.path.open("rb") as f:  # one open file for the whole pass
            for index, offset in enumerate(self.offsets.tolist()):
                f.seek(offset)
                yield self._parse(f.readline(), index)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def line(self, index: int) -> int:
        """The 1-based line of the file that holds row `index` (blank lines hold no row)."""
        before, lines = int(self.offsets[index]), 1
        with self.path.open("rb") as f:
            while before > 0:
                block = f.read(min(before, 1 << 20))
                lines, before = lines + block.count(b"\n"), before - len(block)
        return lines

    def _parse(self, line: bytes, index: int) -> dict:
        try:
            row = json.loads(line)
        except ValueError as e:
            problem = f"is not JSON ({e})"
        except RecursionError:  # the decoder recurses once per level of nesting
            problem = "nests deeper than the JSON reader can follow"
        else:
            problem = None if isinstance(row, dict) else "is not a JSON object"
        if problem:
            raise BadInputError(
                f"cannot read data file: line {self.line(index)} {problem}",
                path=str(self.path),
                hint="check that it is valid json lines: one object per line",
            )
        return renamed(row, self.renames) if self.renames else row

    def column(self, name: str) -> list:
        return [row[name] for row in self]


class CheckedRows(Sequence):
    """Rows checked against their format's `Schema` as they are read: a bad row stops the reader with the file and
    the row (a .jsonl file's line) named. `indices` are the rows of `rows` these are (a slice keeps them)."""

    def __init__(self, rows: Sequence[dict], schema: Schema, source: str, indices: range | None = None):
        self.rows, self.schema, self.source = rows, schema, source
        self.indices = range(len(rows)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return CheckedRows(self.rows, self.schema, self.source, self.indices[index])
        position = self.indices[index]
        return self._checked(self.rows[position], position)

    def __iter__(self):
        indices = self.indices
        read = self.rows[indices.start : indices.stop] if indices.step == 1 else (self.rows[i] for i in indices)
        for position, row in zip(indices, read):
            yield self._checked(row, position)

    def column(self, name: str) -> list:
        """Every row's `name`; an Arrow table's column is read as a column (its rows were checked up front)."""
        if isinstance(self.rows, RowView) and self.indices == range(len(self.rows)):
            return self.rows.column(name)
        return [row[name] for row in self]

    def check(self, indices=None) -> None:
        """Read the rows at `indices` (every row by default), so that a bad one stops the run now."""
        for _ in self if indices is None else (self[i] for i in indices):
            pass

    def _checked(self, row: dict, position: int) -> dict:
        problem = self.schema.problem(row)
        if problem:
            where = f"line {self.rows.line(position)}" if isinstance(self.rows, JsonLines) else f"row {position + 1}"
            raise BadInputError(f"{where}: {problem}", path=self.source, hint="fix or drop the row")
        return row


@dataclass(frozen=True)
class Dataset:
    """Rows of one split and where they came from; `digest` identifies the content for provenance."""

    rows: Sequence[dict]
    source: str
    split: str
    digest: str
    extra: dict = field(default_factory=dict)  # a built-in set's package, version, generator and seed

    @property
    def columns(self) -> list[str]:
        return list(self.rows[0])

    def provenance(self) -> dict:
        return {"source": self.source, "split": self.split, "rows": len(self.rows), "digest": self.digest, **self.extra}


def renamed(row: dict, renames: dict[str, str]) -> dict:
    missing = [c for c in renames if c not in row]
    if missing:
        raise BadInputError(f"--fields names columns {', '.join(missing)} the data lacks; it has {', '.join(row)}")
    kept = {k: v for k, v in row.items() if k in renames or k not in renames.values()}
    return {renames.get(k, k): v for k, v in kept.items()}
