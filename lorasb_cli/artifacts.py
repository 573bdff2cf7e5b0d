"""Read, write and validate lorasb artifacts (DESIGN.md §2): safetensors + `lorasb` provenance metadata.

Kinds: `update` (int8 signs of −G, scale η in metadata), `update-raw` (float32 sums of G and a sample count),
`factors` (B, R, A per module) and `adapter`. Writes are atomic; reads never unpickle.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BadInputError, IncompatibleArtifactError, NonFiniteError

METADATA_KEY = "lorasb"
FORMAT_VERSION = 1
KINDS = ("update", "update-raw", "factors", "adapter")
FACTOR_SUFFIXES = ("lora_B", "lora_R", "lora_A")

# Which command writes each kind: named in errors when a stage gets the wrong file.
PRODUCER = {
    "update": "lorasb estimate (or lorasb combine)",
    "update-raw": "lorasb estimate --raw",
    "factors": "lorasb decompose",
    "adapter": "lorasb train",
}


def library_versions() -> dict[str, str]:
    import safetensors
    import transformers

    from . import __version__

    return {
        "lorasb": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def provenance(kind: str, **fields) -> dict:
    """The metadata every artifact carries: format, kind, versions and creation time plus `fields`."""
    assert kind in KINDS, kind
    return {
        "format": "lorasb",
        "format_version": FORMAT_VERSION,
        "kind": kind,
        **fields,
        "versions": library_versions(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    target = Path(path)
    if target.is_dir():
        raise BadInputError("output path is a directory", path=str(target), hint="pass a file name to -o")
    if not target.parent.is_dir():
        raise BadInputError(
            "output folder does not exist", path=str(target.parent), hint="create it first or pick another -o"
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a finished file gets the usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `tensors` with provenance `meta` atomically; returns the final path."""
    for name, tensor in tensors.items():
        check_finite(name, tensor, str(path))
    header = {"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)}
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)
    return Path(path)


def check_finite(name: str, tensor: torch.Tensor, path: str | None = None) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise NonFiniteError(f"NaN/Inf in tensor '{name}'", path=path, hint="recompute it in float32")


class Artifact:
    """A lorasb safetensors file opened lazily: header and metadata now, tensors on `get`."""

    def __init__(self, path: str | os.PathLike, kinds: tuple[str, ...] | None = None):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise BadInputError("file not found", path=self.path, hint="check the path")
        try:
            with safe_open(self.path, framework="pt") as f:
                header = f.metadata() or {}
                self.names: list[str] = list(f.keys())
        except Exception as e:  # safetensors raises SafetensorError / OSError for bad or truncated files
            raise BadInputError(
                f"not a readable safetensors file ({str(e).splitlines()[0]})",
                path=self.path,
                hint="the file is truncated or of another format; re-create it with the stage that wrote it",
            ) from e
        if METADATA_KEY not in header:
            raise IncompatibleArtifactError(
                "safetensors file without lorasb metadata",
                path=self.path,
                hint="pass a file written by lorasb (estimate, decompose or train)",
            )
        try:
            self.meta: dict = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise IncompatibleArtifactError("corrupt lorasb metadata", path=self.path) from e
        kind = self.meta.get("kind")
        if self.meta.get("format") != "lorasb" or kind not in KINDS:
            raise IncompatibleArtifactError(f"unknown artifact kind '{kind}'", path=self.path)
        if self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise IncompatibleArtifactError(
                f"artifact format version {self.meta['format_version']} is newer than this lorasb reads",
                path=self.path,
                hint="upgrade lorasb",
            )
        if kinds is not None and kind not in kinds:
            wanted = " or ".join(kinds)
            raise IncompatibleArtifactError(
                f"expected a {wanted} artifact, got a {kind}",
                path=self.path,
                hint=f"pass the file written by {PRODUCER[kinds[0]]}",
            )
        self.kind: str = kind

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, checked for NaN/Inf (optionally cast to `dtype`)."""
        with safe_open(self.path, framework="pt") as f:
            tensor = f.get_tensor(name)
        check_finite(name, tensor, self.path)
        return tensor if dtype is None else tensor.to(dtype)

    def items(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors one at a time from one open handle (bounded memory)."""
        with safe_open(self.path, framework="pt") as f:
            for name in self.names:
                tensor = f.get_tensor(name)
                check_finite(name, tensor, self.path)
                yield name, (tensor if dtype is None else tensor.to(dtype))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        with safe_open(self.path, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in self.names}


def update_modules(artifact: Artifact) -> list[str]:
    """Module paths of an update: tensor `<module>.weight` → `<module>`."""
    return [name.removesuffix(".weight") for name in artifact.names]


def factor_modules(artifact: Artifact) -> list[str]:
    """Module paths of a factors/adapter artifact, checking every module has B, R, A of matching shapes."""
    shapes = artifact.shapes()
    modules = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in artifact.names if _is_factor(name)))
    for module in modules:
        missing = [s for s in FACTOR_SUFFIXES if f"{module}.{s}" not in shapes]
        if missing:
            raise IncompatibleArtifactError(
                f"module '{module}' lacks {', '.join(missing)}", path=artifact.path, hint="re-run the stage"
            )
        b, r, a = (shapes[f"{module}.{s}"] for s in FACTOR_SUFFIXES)
        if not (len(b) == len(r) == len(a) == 2 and b[1] == r[0] == r[1] == a[0]):
            raise IncompatibleArtifactError(
                f"module '{module}' has inconsistent shapes B{b} R{r} A{a}", path=artifact.path
            )
    return modules


def _is_factor(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in FACTOR_SUFFIXES
