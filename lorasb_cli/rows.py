"""How rows are held: an Arrow table read on access, a .jsonl file indexed by line offset, and `Dataset`, the
rows of one split with where they came from."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadInputError


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
        for index in range(len(self)):
            yield self[index]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def _parse(self, line: bytes, index: int) -> dict:
        try:
            row = json.loads(line)
        except ValueError as e:
            raise BadInputError(
                f"cannot read data file: row {index + 1} is not JSON ({e})",
                path=str(self.path),
                hint="check that it is valid json lines: one object per line",
            ) from None
        if not isinstance(row, dict):
            raise BadInputError(f"cannot read data file: row {index + 1} is not a JSON object", path=str(self.path))
        return renamed(row, self.renames) if self.renames else row

    def column(self, name: str) -> list:
        return [row[name] for row in self]


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
