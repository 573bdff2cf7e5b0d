"""Bounded-memory tensor I/O over (possibly sharded) safetensors checkpoints in the Hugging Face layout.

`CheckpointIndex` maps tensor names to shard files from headers alone and reads tensors by name or shard by
shard; `ShardWriter` writes tensors into shards of capped size with HF file names and index. Neither ever
unpickles, and neither holds more than one shard open (reader) or buffered (writer) at a time.

Integrity: the writer records each tensor's `tensor_hash` in its shard's header and in the index; the reader
checks every tensor it returns against them (checkpoints without hashes, such as the base models, read as is).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Self

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BadInputError, IncompatibleArtifactError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors header dtype codes (format spec) → torch dtypes.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}

_MAX_HEADER_BYTES = 100_000_000

# Per-tensor content hashes: a merged shard records its own in its header under SHARD_HASH_KEY (a JSON object
# string, as safetensors metadata values are strings) and the index repeats them all under INDEX_HASH_KEY.
SHARD_HASH_KEY = "lorasb_tensor_sha256"
INDEX_HASH_KEY = "tensor_sha256"
HASH_HEX_DIGITS = 32  # 128 bits: ample against corruption, and short enough for thousands of tensors


def tensor_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's safetensors dtype code, shape and raw bytes, as HASH_HEX_DIGITS hex digits.

    Dtype and shape are hashed too: a header edit that keeps the byte size (F32 → I32, [4, 8] → [8, 4]) must
    not pass."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{_DTYPE_CODES[flat.dtype]}{list(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy())  # the bytes as stored (little-endian), no copy
    return digest.hexdigest()[:HASH_HEX_DIGITS]


def tensor_hashes(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {name: tensor_hash(tensor) for name, tensor in tensors.items()}


def hashed_metadata(metadata: dict[str, str], hashes: dict[str, str]) -> dict[str, str]:
    """`metadata` for a shard whose tensors have `hashes` (`tensor_hashes`), recorded for readers to verify."""
    return {**metadata, SHARD_HASH_KEY: json.dumps(hashes, sort_keys=True)}


def is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == HASH_HEX_DIGITS and all(c in "0123456789abcdef" for c in value)


def hash_mismatch(name: str, path: str | os.PathLike, recorded: str, hint: str | None = None) -> BadInputError:
    """The error for a tensor whose bytes, dtype or shape are not those it was written with."""
    return IncompatibleArtifactError(
        f"tensor '{name}' does not match the hash recorded when it was written (sha256 {recorded}): "
        "the file is corrupt or was modified",
        path=str(path),
        hint=hint or "copy the file again, or re-run the stage that wrote it",
    )


# Weight files of the pickle-based formats: named in the error, never opened.
_PICKLE_PATTERNS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: shard file name, dtype, shape, and its size in bytes."""

    shard: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON); no tensor bytes read."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            # safetensors' own cap on header size: a corrupt length must not make us read a whole shard.
            if length > min(os.path.getsize(path) - 8, _MAX_HEADER_BYTES):
                raise ValueError(f"header length {length} is past the end of the file or the 100 MB cap")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")  # noqa: TRY004  (caught below as unreadable)
        return header
    except (OSError, struct.error, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadInputError(
            f"not a readable safetensors file ({e})",
            path=str(path),
            hint="the file is truncated or of another format; download or copy it again",
        ) from e


class CheckpointIndex:
    """Tensor name → shard map of a safetensors checkpoint directory, built from headers only.

    Reads `model.safetensors.index.json` when present, else the single `model.safetensors`.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.directory = Path(model_dir)
        if not self.directory.is_dir():
            raise BadInputError("model directory not found", path=str(self.directory), hint="check the path")
        index_path = self.directory / INDEX_FILE
        index_hashes: dict[str, str] | None = None
        if index_path.is_file():
            weight_map, index_hashes = _read_weight_map(index_path)
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise pickle_checkpoint_error(self.directory)

        listed: dict[str, set[str]] | None = None  # shard → the tensor names the index assigns to it
        if weight_map is not None:
            listed = {}
            for name, shard in weight_map.items():
                listed.setdefault(shard, set()).add(name)

        self._tensors: dict[str, TensorInfo] = {}
        self._shards: dict[str, list[str]] = {}
        # name → recorded content hash, for the tensors whose shard or index records one (lorasb-written).
        self.hashes: dict[str, str] = {}
        for shard in sorted(listed) if listed is not None else [SINGLE_FILE]:
            infos, shard_hashes = _shard_tensors(self.directory / shard, shard)
            if listed is not None:
                missing = sorted(listed[shard] - infos.keys())
                if missing:
                    raise BadInputError(
                        f"the index maps '{missing[0]}' to {shard}, which does not hold it",
                        path=str(index_path),
                        hint="the checkpoint is incomplete or mixed up; download or copy it again",
                    )
                # The index is authoritative: HF loaders ignore shard tensors it does not list.
                infos = {n: info for n, info in infos.items() if n in listed[shard]}
            self._shards[shard] = list(infos)
            self._tensors.update(infos)
            for name in infos:
                # lorasb writes a shard's hashes into the shard and the index alike: any difference between the
                # two (an index copied from another checkpoint, say) is a checkpoint that was changed since.
                in_shard, in_index = (shard_hashes or {}).get(name), (index_hashes or {}).get(name)
                if in_index is not None and in_index != in_shard:
                    raise IncompatibleArtifactError(
                        f"the index records a hash for '{name}' that {shard} "
                        + ("does not record" if in_shard is None else "contradicts"),
                        path=str(index_path),
                        hint="the checkpoint is mixed up; copy it again or re-run the merge",
                    )
                if in_shard is not None:
                    self.hashes[name] = in_shard

    def names(self) -> list[str]:
        """Every tensor name, shard by shard, in each shard's storage order."""
        return list(self._tensors)

    def shard_files(self) -> list[str]:
        """Shard file names (relative to the directory), in order."""
        return list(self._shards)

    def tensors_in(self, shard_file: str) -> list[str]:
        return list(self._shards[shard_file])

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor '{name}' in {self.directory}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        """One tensor by name, read from its shard (only that tensor's bytes), checked against its recorded hash."""
        with safe_open(self.directory / self.info(name).shard, framework="pt") as f:
            return self._checked(name, f.get_tensor(name))

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, shard by shard, with exactly one shard open at a time."""
        for shard, names in self._shards.items():
            with safe_open(self.directory / shard, framework="pt") as f:
                for name in names:
                    yield name, self._checked(name, f.get_tensor(name))

    def verify(self) -> int:
        """Read every tensor that has a recorded hash and check it; returns how many were checked."""
        for shard, names in self._shards.items():
            hashed = [n for n in names if n in self.hashes]
            if hashed:
                with safe_open(self.directory / shard, framework="pt") as f:
                    for name in hashed:
                        self._checked(name, f.get_tensor(name))
        return len(self.hashes)

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        recorded = self.hashes.get(name)
        if recorded is not None and tensor_hash(tensor) != recorded:
            raise hash_mismatch(name, self.directory / self.info(name).shard, recorded)
        return tensor


def verify_file(path: str | os.PathLike) -> tuple[int, int]:
    """Check each tensor of one safetensors file against the hashes its header records (SHARD_HASH_KEY);
    returns (tensors checked, tensors in the file)."""
    path = Path(path)
    infos, hashes = _shard_tensors(path, path.name)
    if hashes:
        with safe_open(path, framework="pt") as f:
            for name in infos:
                if tensor_hash(f.get_tensor(name)) != hashes[name]:
                    raise hash_mismatch(name, path, hashes[name])
    return len(hashes or {}), len(infos)


def _read_weight_map(index_path: Path) -> tuple[dict[str, str], dict[str, str] | None]:
    """The index's weight map, and the tensor hashes its metadata records (None when it records none)."""
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of file names")
        hashes = (index.get("metadata") or {}).get(INDEX_HASH_KEY)
        if hashes is not None:
            _check_hashes(hashes, weight_map)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadInputError(
            f"unreadable checkpoint index ({e})", path=str(index_path), hint="download or copy the checkpoint again"
        ) from e
    return weight_map, hashes


def _check_hashes(hashes: object, names: Iterable[str]) -> None:
    """A recorded hash map must be {name: hash} for exactly `names`: a name more or less is a corrupt file."""
    if not isinstance(hashes, dict) or not all(is_hash(h) for h in hashes.values()):
        raise ValueError("its tensor hashes are not an object of sha256 prefixes")
    names = set(names)
    odd = sorted(names ^ hashes.keys())
    if odd:
        which = "has no recorded hash" if odd[0] in names else "has a hash but is not stored"
        raise ValueError(f"tensor '{odd[0]}' {which}")


def _shard_tensors(path: Path, shard: str) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """TensorInfo of every tensor in one shard file, in storage (data offset) order, and the hashes the shard
    records (None when it records none)."""
    if not path.is_file():
        raise BadInputError(
            "a shard listed in the checkpoint index is missing",
            path=str(path),
            hint="download or copy the complete checkpoint",
        )
    header = read_header(path)
    metadata = header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    hashes = None
    try:
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        for name, entry in entries:
            code = entry["dtype"]
            if code not in _DTYPES:
                raise BadInputError(f"tensor '{name}' has unsupported dtype {code}", path=str(path))
            start, end = entry["data_offsets"]
            infos[name] = TensorInfo(shard, _DTYPES[code], tuple(int(d) for d in entry["shape"]), end - start)
        if isinstance(metadata, dict) and SHARD_HASH_KEY in metadata:
            hashes = json.loads(metadata[SHARD_HASH_KEY])
            _check_hashes(hashes, infos)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise BadInputError(
            f"malformed safetensors header ({e!r})", path=str(path), hint="download or copy the file again"
        ) from e
    return infos, hashes


def pickle_checkpoint_error(directory: Path, option: str | None = None) -> BadInputError:
    """The refusal of a checkpoint without safetensors weights; `option` names the flag that would load it anyway."""
    found = sorted(p.name for pattern in _PICKLE_PATTERNS for p in directory.glob(pattern))
    if found:
        return BadInputError(
            f"checkpoint is not safetensors (found {', '.join(found)}); lorasb does not unpickle weights",
            path=str(directory),
            hint="convert it: load it with transformers' from_pretrained and save_pretrained(NEW_DIR, "
            "safe_serialization=True) (the only format transformers >= 5 writes), then pass NEW_DIR"
            + (f"; or pass {option} (torch.load with weights_only=True)" if option else ""),
        )
    return BadInputError(
        f"no {SINGLE_FILE} or {INDEX_FILE} found",
        path=str(directory),
        hint="pass a Hugging Face model directory with safetensors weights",
    )


class ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_size_bytes` tensor bytes each.

    A tensor larger than the cap gets a shard of its own. Shards go to hidden temporary files in `out_dir`
    and get their HF names (`model-0000k-of-0000N.safetensors`, or `model.safetensors` for one shard) only
    in `finalize`, so an interrupted write leaves nothing a loader would read. Use as a context manager to
    delete the temporary files when the block raises. Each shard's header records its tensors' hashes
    (SHARD_HASH_KEY) and the index all of them (INDEX_HASH_KEY), for `CheckpointIndex` and `inspect --verify`.
    The files are private (0600, from mkstemp and save_file): write into an `files.atomic_folder`, which gives
    them the usual modes when it publishes the folder.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_size_bytes: int, metadata: dict[str, str] | None = None):
        if max_shard_size_bytes < 1:
            raise ValueError(f"max_shard_size_bytes must be at least 1, got {max_shard_size_bytes}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Refuse rather than mix: a stale model.safetensors beside a new index would win in from_pretrained.
        existing = sorted(p.name for p in self.out_dir.glob("model*.safetensors*"))
        if existing:
            raise BadInputError(
                f"output directory already holds weights ({', '.join(existing)})",
                path=str(self.out_dir),
                hint="pick a new or empty output directory",
            )
        self.max_shard_size = max_shard_size_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # temporary shard files and their tensor names
        self._names: set[str] = set()
        self._hashes: dict[str, str] = {}  # of every flushed tensor: the index records them all
        self._total_size = 0
        self._finalized = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Buffer `tensor` under `name`, first flushing the buffered shard if `tensor` would overflow it."""
        if self._finalized:
            raise RuntimeError("ShardWriter.add after finalize")
        if name in self._names:
            raise ValueError(f"tensor '{name}' added twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffered_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._names.add(name)
        self._buffer[name] = tensor.detach().cpu().contiguous()
        self._buffered_bytes += nbytes
        self._total_size += nbytes

    def finalize(self) -> list[Path]:
        """Flush, give shards their final names, write the index (more than one shard); returns the files."""
        if self._finalized:
            raise RuntimeError("ShardWriter.finalize called twice")
        if self._buffer:
            self._flush()
        if not self._written:
            raise ValueError("ShardWriter.finalize with no tensors added")
        count = len(self._written)
        written: list[Path] = []
        weight_map: dict[str, str] = {}
        for k, (tmp, names) in enumerate(self._written, start=1):
            final = SINGLE_FILE if count == 1 else f"model-{k:05d}-of-{count:05d}.safetensors"
            os.replace(tmp, self.out_dir / final)
            written.append(self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        if count > 1:
            # Written last: a checkpoint only exists for loaders once every shard it names is in place.
            written.append(write_index(self.out_dir, weight_map, total_size=self._total_size, hashes=self._hashes))
        self._finalized = True
        return written

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for tmp, _ in self._written:
                tmp.unlink(missing_ok=True)

    def _flush(self) -> None:
        tmp = _temp_file(self.out_dir, ".safetensors.tmp")
        hashes = tensor_hashes(self._buffer)
        self._hashes.update(hashes)
        metadata = hashed_metadata(self.metadata, hashes)
        try:
            save_file(self._buffer, str(tmp), metadata=metadata)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._written.append((tmp, list(self._buffer)))
        self._buffer = {}
        self._buffered_bytes = 0


def write_index(
    out_dir: str | os.PathLike,
    weight_map: dict[str, str],
    *,
    total_size: int,
    hashes: dict[str, str],
    base: dict | None = None,
) -> Path:
    """Write INDEX_FILE into `out_dir`: `weight_map` {tensor name: shard file}, `total_size` (tensor bytes of
    all shards) and the shards' `hashes` in its metadata. `base`: an index read from another checkpoint (a merge
    keeps its base's layout) whose other fields and metadata entries are kept. Returns the index's path.

    Through a temporary file renamed onto INDEX_FILE, so a loader never sees half an index."""
    index = dict(base or {})
    # The base's own hashes, if it records any, are of its tensors, not these: replaced like total_size.
    index["metadata"] = {**(index.get("metadata") or {}), "total_size": total_size, INDEX_HASH_KEY: hashes}
    index["weight_map"] = weight_map
    tmp = _temp_file(out_dir, ".index.json.tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    path = Path(out_dir) / INDEX_FILE
    os.replace(tmp, path)
    return path


def _temp_file(out_dir: str | os.PathLike, suffix: str) -> Path:
    """A new hidden file in `out_dir` (`.lorasb-*<suffix>`): renamed onto its final name once complete."""
    fd, name = tempfile.mkstemp(prefix=".lorasb-", suffix=suffix, dir=out_dir)
    os.close(fd)
    return Path(name)


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """Bytes in `size`: an integer, or a number with a unit, e.g. "5GB" (GB = 10**9) or "2GiB" (GiB = 2**30)."""
    text = str(size)
    match = _SIZE_RE.fullmatch(text)
    number, unit = (Decimal(match[1]), match[2].upper()) if match else (Decimal(0), "?")
    if unit not in _SIZE_UNITS or number * _SIZE_UNITS[unit] < 1:
        raise BadInputError(
            f"invalid size '{text}'", hint="give a positive number of bytes or a size with a unit: 5GB, 500MB, 2GiB"
        )
    return int(number * _SIZE_UNITS[unit])
