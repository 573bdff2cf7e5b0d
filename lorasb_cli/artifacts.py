"""Read, write and validate lorasb artifacts (DESIGN.md §2): safetensors + `lorasb` provenance metadata.

Kinds: `update` (int8 signs of −G, scale η in metadata), `update-raw` (float32 sums of G and a sample count),
`factors` (B, R, A per module) and `adapter`. Writes are atomic; reads never unpickle.

Every read goes through one schema (`read_provenance`): size and nesting limits before the JSON is parsed, then
each field's type and range, then integrity. An artifact records the sha256 of each tensor (dtype, shape and
bytes; `shards.tensor_hash`) under `tensor_sha256` and of the rest of its metadata under `metadata_sha256`;
`Artifact.get`/`items` check each tensor as they read it. Artifacts written before hashes were recorded still
load, unverified.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import errno
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import shards
from .errors import BadInputError, IncompatibleArtifactError, LorasbError, NonFiniteError

METADATA_KEY = "lorasb"
FORMAT_VERSION = 1
KINDS = ("update", "update-raw", "factors", "adapter")
FACTOR_SUFFIXES = ("lora_B", "lora_R", "lora_A")

TENSOR_HASHES = "tensor_sha256"
METADATA_HASH = "metadata_sha256"
# Checked before parsing: a corrupt or hostile header must cost neither memory nor recursion. The size allows
# for fields that grow with the model (each tensor's hash, each module's energy), so huge MoE models fit.
MAX_METADATA_BYTES = 1_000_000
METADATA_BYTES_PER_TENSOR = 256
MAX_METADATA_DEPTH = 32

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
    # Hashes copied from an artifact read earlier describe its tensors, not these: write_artifact records new ones.
    fields = {k: v for k, v in fields.items() if k not in (TENSOR_HASHES, METADATA_HASH)}
    return {
        "format": "lorasb",
        "format_version": FORMAT_VERSION,
        "kind": kind,
        **fields,
        "versions": library_versions(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def file_sha256(path: Path) -> str:
    """The sha256 (64 hex digits) of the file at `path`, read in 4 MiB blocks: memory stays flat for any size."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# Write failures the storage causes, not lorasb: (what happened, what to do), by errno.
_STORAGE_ERRORS = {
    errno.EROFS: ("read-only file system", "pick an -o on a writable file system"),
    errno.ENOSPC: ("no space left on the device", "free space, or pick an -o on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or pick another -o"),
    errno.EIO: ("input/output error", "check the disk, or pick an -o on another one"),
    errno.EACCES: ("permission denied", "pick another -o or fix its permissions"),
}


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write under `path` that the storage fails (read-only, full, over quota, I/O error) into one
    BadInputError, `cannot write <path> (<why>) — <fix>`, whichever library wrote: safetensors and torch.save
    report a full disk in their own exception types, with the system's message inside or, torch's zip writer,
    without it."""
    try:
        yield
    except LorasbError:
        raise
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRORS:
            why, fix = _STORAGE_ERRORS[e.errno]
        elif found := next((v for code, v in _STORAGE_ERRORS.items() if os.strerror(code) in str(e)), None):
            why, fix = found
        elif "inline_container" in str(e):  # torch.save's writer, which loses the system's error
            why, fix = "the file could not be completed: a full or failing disk", _STORAGE_ERRORS[errno.ENOSPC][1]
        else:
            raise
        raise BadInputError(f"cannot write {path} ({why})", hint=fix) from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds, with the mode a plain
    `open()` would have given it (`plain_modes`). A write the storage fails is one error (`storage_errors`)."""
    target = Path(path)
    if target.is_dir():
        raise BadInputError("output path is a directory", path=str(target), hint="pass a file name to -o")
    make_output_folder(target.parent)
    tmp = None
    try:
        with storage_errors(target):
            for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):  # of a writer that was killed
                stale.unlink(missing_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            yield Path(tmp)
            plain_modes(Path(tmp))
            os.replace(tmp, target)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(target: Path, *, replace: bool = False, hint: str = "pick another -o") -> Iterator[Path]:
    """Yield an empty hidden folder beside `target` to write into; when the block succeeds, give everything in it
    the modes a plain write gets (`plain_modes`) and rename it onto `target`, so a reader sees the whole folder or
    none. A `target` that holds anything by then is refused (BadInputError with `hint`) unless `replace`: then the
    old folder is removed only after the new one is in place."""
    make_output_folder(target.parent)
    with storage_errors(target):
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), dir=target.parent))
    try:
        with storage_errors(target):
            yield staging
            # Checked again here: another process may have written there while the block ran.
            check_output_dir(target, {}, allow_nonempty=replace, hint=hint)
            swap_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def swap_folder(staging: Path, target: Path) -> None:
    """Put the finished folder `staging` in `target`'s place, with the modes a plain write gets (`plain_modes`);
    an old `target` is removed only once the new one is in place, and is put back if the rename fails."""
    plain_modes(staging)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old)  # `old` is an empty folder: the rename replaces it
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old)


def remove_stale_staging(target: Path) -> None:
    """Delete the staging folders `atomic_folder` left beside `target` when a writer was killed. Only for outputs
    that one writer owns (an -o): a shared cache folder may be another process's staging in progress."""
    for stale in target.parent.glob(f"{glob.escape(_staging_prefix(target))}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def plain_modes(path: Path) -> None:
    """Give `path` — a file, or a folder and everything in it — the mode a plain `open()` (0o666) or `mkdir`
    (0o777) gets under the process's umask: mkstemp and mkdtemp make 0600/0700 whatever the umask, and so does
    safetensors' `save_file`, so a model another user (a serving container) must read would otherwise be private.
    Symbolic links are left alone."""
    umask = current_umask()
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    for folder, _, files in os.walk(path):
        os.chmod(folder, folder_mode)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), file_mode)


def current_umask() -> int:
    """The process's umask. Read from /proc/self/status where Linux shows it, since setting and restoring it
    (the only other way) changes it for every thread meanwhile; then set to 0o077, so that a file another thread
    creates in that instant is private rather than public."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def check_output(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], *, folder: bool = False) -> Path:
    """Refuse an output that is, lies inside or (a `folder` output) would hold one of `inputs` ({what: path}: model
    directory or weight file, data, update, factors, adapter), compared by real path and, for existing files, by
    inode (a hard link is the same file). Inputs that are not local paths (hub ids, built-in data names) pass.
    A file output that is a folder, or a folder output that is a file, is refused too, and so is any output that
    exists as neither (a device, FIFO or socket: the rename into place would replace the node, /dev/null included).
    Returns `out` as a Path."""
    out = Path(out).expanduser()
    if out.exists() and not (out.is_file() or out.is_dir()):
        kind = next((k for k, test in _SPECIAL_FILES if test(out.stat().st_mode)), "special file")
        raise BadInputError(f"output path is a {kind}, not a file", path=str(out), hint="pass a file name to -o")
    if not folder and out.is_dir():
        raise BadInputError("output path is a directory", path=str(out), hint="pass a file name to -o")
    if folder and out.exists() and not out.is_dir():
        raise BadInputError("output path is a file", path=str(out), hint="pass a directory name to -o")
    target = Path(os.path.realpath(out))
    for what, given in inputs.items():
        source = Path(given).expanduser() if given is not None else None
        if source is None or not source.exists():
            continue
        real = Path(os.path.realpath(source))
        same_file = out.is_file() and os.path.samefile(out, source)
        if same_file or target.is_relative_to(real) or (folder and real.is_relative_to(target)):
            raise BadInputError(
                f"the output would overwrite or write into the {what}", path=str(out), hint=f"pick an -o outside {real}"
            )
    return out


_SPECIAL_FILES = (
    ("character device", stat.S_ISCHR),
    ("block device", stat.S_ISBLK),
    ("FIFO", stat.S_ISFIFO),
    ("socket", stat.S_ISSOCK),
)


def check_output_dir(
    out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], *, allow_nonempty: bool, hint: str
) -> Path:
    """`check_output(out, inputs, folder=True)`, then refuse an `out` that exists and holds anything, unless
    `allow_nonempty` (merge's --overwrite; train's --overwrite or --resume). `hint` says what the command's user
    can do instead. Returns `out` as a Path.

    Overlap with an input is checked first: there --overwrite would not help, so the hint to pass it would mislead.
    """
    out = check_output(out, inputs, folder=True)
    # A lock alone is no content: under a launcher rank 0 may have locked the folder before another rank looks, and
    # whether its holder still runs is folder_lock's question.
    if not allow_nonempty and out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise BadInputError("output directory exists and is not empty", path=str(out), hint=hint)
    return out


LOCK_FILE = ".lorasb.lock"


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Keep a second `what` out of `folder` while this one writes into it (`output_lock` with the lock file inside
    it). Temp files of killed writers are removed once the lock is held."""
    with output_lock(folder / LOCK_FILE, what, folder):
        for stale in [*folder.glob(".*.tmp"), *folder.glob("*/.*.tmp")]:  # atomic_path's, from killed writers
            stale.unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def output_lock(lock: Path, what: str, output: Path) -> Iterator[None]:
    """Keep a second `what` from writing `output` while this one does: the file `lock` holds `host pid`; one left
    by a process of this host that no longer runs is taken over."""
    me = f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = lock.read_text(errors="replace").strip() if lock.is_file() else ""
            host, _, pid = holder.partition(" ")
            if not (host == socket.gethostname() and pid.isdigit() and not _running(int(pid))):
                raise BadInputError(
                    f"another {what} is writing into this folder ({holder or 'unknown process'})",
                    path=str(output),
                    hint=f"wait for it or pick another -o; if that process is gone, delete {lock}",
                ) from None
            lock.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        f.write(me + "\n")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_output_folder(folder: Path) -> None:
    """Create an output folder and its parents, as `mkdir -p`; a path under a regular file or on storage that
    cannot be written (`storage_errors`) is a one-line error."""
    try:
        with storage_errors(folder):
            folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise BadInputError(
            "output folder lies under a regular file", path=str(blocker), hint="pick another -o"
        ) from None


def write_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `tensors` with provenance `meta` and their hashes atomically; returns the final path.

    The metadata is validated first by the reader's schema: no stage writes a file a later stage refuses."""
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    for name, tensor in contiguous.items():
        check_finite(name, tensor, str(path))
    text = _sealed({**meta, TENSOR_HASHES: {name: shards.tensor_hash(t) for name, t in contiguous.items()}})
    try:
        read_provenance(text, str(path), list(contiguous))
    except IncompatibleArtifactError as e:
        raise BadInputError(
            f"refusing to write an artifact whose {e.message}",
            path=str(path),
            hint="check the option that sets it (e.g. --eta must be a finite number > 0)",
        ) from None
    header = {"format": "pt", METADATA_KEY: text}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)
    return Path(path)


def check_finite(name: str, tensor: torch.Tensor, path: str | None = None) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise NonFiniteError(f"NaN/Inf in tensor '{name}'", path=path, hint="recompute it in float32")


@dataclass(frozen=True)
class BaseModel:
    """`base_model`: the model an artifact was made from (the id is for people; stages match the fingerprint)."""

    id: str
    fingerprint: str


@dataclass(frozen=True)
class Provenance:
    """The validated `lorasb` metadata of one artifact. `fields` is the whole JSON object as written, with the
    typed fields below already checked in it (stages read it as `Artifact.meta`)."""

    kind: str
    format_version: int
    base_model: BaseModel
    targets: str | tuple[str, ...] | None
    method: str | None
    rank: int | None
    rank_pattern: dict[str, int]  # modules whose rank is not `rank` (decompose --budget)
    eta: float | None
    scale: float
    samples: int | None
    head: tuple[str, ...]
    labels: tuple[str, ...] | None
    tensor_sha256: dict[str, str] | None  # None: written before lorasb recorded hashes
    fields: dict


# Fields each kind must carry, because the stages reading that kind use them: decompose and combine read an
# update's η, targets and base model; combine reads a raw shard's sampling and counts; train reads the rank.
_REQUIRED = {
    "update": {"base_model", "targets", "eta"},
    "update-raw": {"base_model", "targets", "eta", "method", "data", "samples", "tokens", "seed", "dtype"},
    "factors": {"base_model", "rank"},
    "adapter": {"base_model"},
}
_CORRUPT_HINT = "the file is corrupt or was edited; re-create it with {producer}"
_STRINGS = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)  # possessive: linear even on hostile input
_BRACKETS = re.compile(r"[\[\]{}]")


def read_provenance(text: str, path: str, names: Sequence[str], kinds: tuple[str, ...] | None = None) -> Provenance:
    """Parse and validate the `lorasb` metadata of the artifact at `path`, whose tensors are `names`.

    `kinds`: the kinds the caller accepts. Every violation is one IncompatibleArtifactError naming the file and
    the field."""
    meta = parse_metadata(text, path, MAX_METADATA_BYTES + METADATA_BYTES_PER_TENSOR * len(names))
    return _Fields(meta, path, names).validate(kinds)


def parse_metadata(text: object, path: str, limit: int = MAX_METADATA_BYTES) -> dict:
    """The JSON object in a `lorasb` metadata string, refused (one line naming `path`) when over `limit` bytes,
    nested deeper than MAX_METADATA_DEPTH, not JSON or not an object."""
    hint = _CORRUPT_HINT.format(producer="the lorasb stage that wrote it")
    if not isinstance(text, str):
        raise IncompatibleArtifactError("lorasb metadata is not a string", path=path, hint=hint)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise IncompatibleArtifactError(
            f"lorasb metadata is {size:,} bytes, over the limit of {limit:,}", path=path, hint=hint
        )
    depth = _json_depth(text)
    if depth > MAX_METADATA_DEPTH:
        raise IncompatibleArtifactError(
            f"lorasb metadata nests {depth} levels deep, over the limit of {MAX_METADATA_DEPTH}", path=path, hint=hint
        )
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints past Python's 4300-digit limit
        raise IncompatibleArtifactError(f"lorasb metadata is not valid JSON ({e})", path=path, hint=hint) from None
    if not isinstance(meta, dict):
        raise IncompatibleArtifactError(
            f"lorasb metadata is a JSON {_json_type(meta)}, not an object", path=path, hint=hint
        )
    return meta


class _Fields:
    """Type and range checks of one artifact's metadata; each failure names the file and the field."""

    def __init__(self, meta: dict, path: str, names: Sequence[str]):
        self.meta, self.path, self.names = meta, path, names
        self.hint = _CORRUPT_HINT.format(producer="the lorasb stage that wrote it")
        self.required: set[str] = set()

    def fail(self, key: str, problem: str, hint: str | None = None) -> NoReturn:
        raise IncompatibleArtifactError(f"metadata field '{key}' {problem}", path=self.path, hint=hint or self.hint)

    def value(self, key: str, want: str, ok: Callable[[object], bool], *, nullable: bool = False):
        """`key`'s value if `ok(value)`; None if absent and not required (or null and `nullable`)."""
        if key not in self.meta:
            if key in self.required:
                self.fail(key, f"is missing; it must be {want}")
            return None
        value = self.meta[key]
        if value is None and nullable and key not in self.required:
            return None
        if not ok(value):
            self.fail(key, f"is {_show(value)}; it must be {want}")
        return value

    def string(self, key: str, **kw) -> str | None:
        return self.value(key, "a string", lambda v: isinstance(v, str), **kw)

    def integer(self, key: str, minimum: int | None = None, **kw) -> int | None:
        want = "an integer" if minimum is None else f"an integer ≥ {minimum}"
        return self.value(key, want, lambda v: _is_int(v) and (minimum is None or v >= minimum), **kw)

    def number(self, key: str, positive: bool = False, **kw) -> float | None:
        want = "a finite number > 0" if positive else "a finite number"
        value = self.value(key, want, lambda v: _is_number(v) and math.isfinite(v) and (v > 0 or not positive), **kw)
        return None if value is None else float(value)

    def strings(self, key: str, **kw) -> tuple[str, ...] | None:
        value = self.value(key, "a list of strings", _is_strs, **kw)
        return None if value is None else tuple(value)

    def object(self, key: str, **kw) -> dict | None:
        return self.value(key, "an object", lambda v: isinstance(v, dict), **kw)

    def validate(self, kinds: tuple[str, ...] | None) -> Provenance:
        """The Provenance of the metadata. Fields are checked in a fixed order (format, kind, base model, then
        the rest) and the first violation is raised, so a file with several always gets the same error."""
        self.required = {"format_version", "kind"}
        version = self._format_version()
        kind = self._kind(kinds)
        base = self._base_model()
        targets = self.value(
            "targets", "a string or a list of strings", lambda v: isinstance(v, str) or _is_strs(v), nullable=True
        )
        method = self.string("method")
        for key in ("init", "dtype", "architecture", "created"):
            self.string(key)
        self.integer("seed", nullable=True)
        samples = self.integer("samples", minimum=0, nullable=True)
        self.integer("tokens", minimum=0, nullable=True)
        # η scales every update (ΔW = η·signs): only updates must have one; a weight-based init's factors have none.
        eta = self.number("eta", positive=True, nullable=kind in ("factors", "adapter"))
        rank = self.integer("rank", minimum=1, nullable=kind == "adapter") if kind in ("factors", "adapter") else None
        rank_pattern = self.value(
            "rank_pattern",
            "an object of module: rank ≥ 1",
            lambda v: isinstance(v, dict) and all(_is_int(r) and r >= 1 for r in v.values()),
        )
        scale = self.number("scale")
        labels, head = self._head()
        versions = self.object("versions")
        if versions is not None and not all(isinstance(v, str) for v in versions.values()):
            self.fail("versions", "must map each library to a version string")
        self._check_data()
        hashes = self._check_integrity()
        return Provenance(
            kind=kind,
            format_version=version,
            base_model=base,
            targets=tuple(targets) if isinstance(targets, list) else targets,
            method=method,
            rank=rank,
            rank_pattern=rank_pattern or {},
            eta=eta,
            scale=1.0 if scale is None else scale,
            samples=samples,
            head=head,
            labels=labels,
            tensor_sha256=hashes,
            fields=self.meta,
        )

    def _format_version(self) -> int:
        """`format` must be "lorasb" and `format_version` one this lorasb reads (≤ FORMAT_VERSION)."""
        if self.meta.get("format") != "lorasb":
            found = _show(self.meta["format"]) if "format" in self.meta else "missing"
            self.fail(
                "format",
                f'is {found}, not "lorasb": this is no lorasb artifact',
                hint="pass a file written by lorasb (estimate, decompose or train)",
            )
        version = self.integer("format_version", minimum=1)
        if version > FORMAT_VERSION:
            raise IncompatibleArtifactError(
                f"artifact format version {version} is newer than this lorasb reads ({FORMAT_VERSION})",
                path=self.path,
                hint="upgrade lorasb",
            )
        return version

    def _kind(self, kinds: tuple[str, ...] | None) -> str:
        """`kind`, one of `kinds` (None: any); from here on, errors name the stage that writes it and the fields
        it must carry are required."""
        kind = self.value("kind", f"one of {', '.join(KINDS)}", lambda v: v in KINDS)
        if kinds is not None and kind not in kinds:
            raise IncompatibleArtifactError(
                f"expected a {' or '.join(kinds)} artifact, got a {kind}",
                path=self.path,
                hint=f"pass the file written by {PRODUCER[kinds[0]]}",
            )
        self.hint = _CORRUPT_HINT.format(producer=PRODUCER[kind])
        self.required |= _REQUIRED[kind]
        return kind

    def _base_model(self) -> BaseModel:
        """`base_model`: an object with string `id` and `fingerprint` (required of every kind)."""
        base = self.object("base_model")
        for key in ("id", "fingerprint"):
            if not isinstance(base.get(key), str):
                self.fail(f"base_model.{key}", f"is {_show(base.get(key))}; it must be a string")
        return BaseModel(base["id"], base["fingerprint"])

    def _head(self) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
        """(`labels`, `head`): a classifier's class names, and the names of its trained head tensors (each held
        by the file)."""
        labels = self.strings("labels")
        if labels is not None and not isinstance(self.meta.get("architecture"), str):
            # merge and evaluate rebuild the classifier from both: its class and its labels.
            found = _show(self.meta["architecture"]) if "architecture" in self.meta else "missing"
            self.fail("architecture", f"is {found} beside 'labels'; it must be the classifier's class name")
        head = self.strings("head") or ()
        missing = [name for name in head if name not in self.names]
        if missing:
            self.fail("head", f"names tensor '{missing[0]}', which the file does not hold")
        return labels, tuple(head)

    def _check_data(self) -> None:
        """The data provenance: train compares its template; combine matches shards by their `shard` [i, n]."""
        data = self.object("data", nullable=True)
        if data is None:
            return
        template = data.get("template")
        if template is not None and not isinstance(template, str):
            self.fail("data.template", f"is {_show(template)}; it must be a string")
        shard = data.get("shard")
        ok = shard is None or (
            isinstance(shard, list) and len(shard) == 2 and all(_is_int(x) for x in shard) and 0 <= shard[0] < shard[1]
        )
        if not ok:
            self.fail("data.shard", f"is {_show(shard)}; it must be [i, n] with 0 ≤ i < n")

    def _check_integrity(self) -> dict[str, str] | None:
        """The recorded hashes: one per tensor (exactly the file's tensors), and one of the other fields."""
        if TENSOR_HASHES not in self.meta and METADATA_HASH not in self.meta:
            if _UNVERIFIED_ALLOWED.get():
                return None
            # Written before lorasb recorded hashes, or stripped of them: nothing stands guard over its tensors.
            raise IncompatibleArtifactError(
                "the file records no hashes of its tensors, so they cannot be verified",
                path=self.path,
                hint="re-create it with the lorasb stage that wrote it, or pass --allow-unverified to read it anyway",
            )
        self.required |= {TENSOR_HASHES, METADATA_HASH}  # one without the other is a damaged file
        hashes = self.value(
            TENSOR_HASHES,
            "an object mapping each tensor to its sha256 prefix",
            lambda v: isinstance(v, dict) and all(shards.is_hash(h) for h in v.values()),
        )
        digest = self.value(METADATA_HASH, "a sha256 prefix", shards.is_hash)
        odd = sorted(set(self.names) ^ hashes.keys())
        if odd and odd[0] in self.names:
            self.fail(TENSOR_HASHES, f"records no hash of tensor '{odd[0]}', which the file holds")
        if odd:
            self.fail(TENSOR_HASHES, f"names tensor '{odd[0]}', which the file does not hold")
        if _metadata_digest({k: v for k, v in self.meta.items() if k != METADATA_HASH}) != digest:
            raise IncompatibleArtifactError(
                "lorasb metadata does not match the hash recorded when it was written",
                path=self.path,
                hint=self.hint,
            )
        return hashes


def _sealed(meta: dict) -> str:
    """`meta` as the JSON written to a file, with the hash of its other fields under METADATA_HASH."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != METADATA_HASH}))  # as a reader parses it
    return json.dumps({**body, METADATA_HASH: _metadata_digest(body)}, sort_keys=True)


def _metadata_digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[: shards.HASH_HEX_DIGITS]


def _json_depth(text: str) -> int:
    """How deep arrays and objects nest in `text`, without parsing it (so without recursion)."""
    steps = (1 if c in "[{" else -1 for c in _BRACKETS.findall(_STRINGS.sub("", text)))
    return max(itertools.accumulate(steps), default=0)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_strs(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {list: "array", dict: "object", str: "string"}.get(type(value), "number")


def _show(value: object) -> str:
    """A value as an error names it: numbers and short strings as they are, anything else by its JSON type."""
    if _is_number(value):
        return repr(value)
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40])}" + ("…" if len(value) > 40 else "")
    return "null" if value is None else f"a JSON {_json_type(value)}"


class Artifact:
    """A lorasb safetensors file opened lazily: header and metadata now, tensors on `get`."""

    def __init__(self, path: str | os.PathLike, kinds: tuple[str, ...] | None = None):
        self.path = str(path)
        self.kinds = kinds
        if not os.path.isfile(self.path):
            raise BadInputError("file not found", path=self.path, hint="check the path")
        try:
            with safe_open(self.path, framework="pt") as f:
                header = f.metadata() or {}
                self.names: list[str] = list(f.keys())
        except Exception as e:  # safetensors raises SafetensorError / OSError for bad or truncated files
            raise _unreadable(self.path, e, self.kinds) from e
        if METADATA_KEY not in header:
            raise IncompatibleArtifactError(
                "safetensors file without lorasb metadata",
                path=self.path,
                hint="pass a file written by lorasb (estimate, decompose or train)",
            )
        self.provenance: Provenance = read_provenance(header[METADATA_KEY], self.path, self.names, kinds)
        self.meta: dict = self.provenance.fields  # the validated JSON object, read by the stages as a dict
        self.kind: str = self.provenance.kind
        self.hashes: dict[str, str] | None = self.provenance.tensor_sha256  # None: written before hashes
        self._name_set = set(self.names)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, checked against its recorded hash and for NaN/Inf (optionally cast to `dtype`)."""
        if name not in self._name_set:
            raise IncompatibleArtifactError(
                f"no tensor '{name}' in the artifact", path=self.path, hint=f"re-create it with {PRODUCER[self.kind]}"
            )
        with self._open() as f:
            tensor = self._checked(name, f.get_tensor(name))
        return tensor if dtype is None else tensor.to(dtype)

    def items(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Tensors one at a time from one open handle (bounded memory), each checked as `get` does."""
        with self._open() as f:
            for name in self.names:
                tensor = self._checked(name, f.get_tensor(name))
                yield name, (tensor if dtype is None else tensor.to(dtype))

    def verify(self) -> int:
        """Read and check every tensor; returns how many had a recorded hash (0 for an older artifact)."""
        for _ in self.items():
            pass
        return len(self.hashes or {})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        with self._open() as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in self.names}

    def _checked(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # Hash first: flipped bytes that happen to make a NaN are corruption, and should be named as such.
        if self.hashes is not None and shards.tensor_hash(tensor) != self.hashes[name]:
            raise shards.hash_mismatch(
                name, self.path, self.hashes[name], hint=f"copy it again, or re-create it with {PRODUCER[self.kind]}"
            )
        check_finite(name, tensor, self.path)
        return tensor

    @contextlib.contextmanager
    def _open(self) -> Iterator:
        """safe_open, with a file that changed or vanished since it was opened reported as unreadable."""
        try:
            handle = safe_open(self.path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise _unreadable(self.path, e, self.kinds) from e
        with handle as f:
            yield f


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
        (m, rank), n = b, a[1]
        if rank > min(m, n):
            raise IncompatibleArtifactError(
                f"module '{module}' has rank {rank}, more than min(m, n) = {min(m, n)} of its {m}×{n} weight",
                path=artifact.path,
                hint=f"re-run lorasb decompose with --rank {min(m, n)} or less",
            )
        # decompose records each module's rank: `rank`, or the module's in `rank_pattern` (--budget).
        provenance = artifact.provenance
        recorded = provenance.rank_pattern.get(module, provenance.rank)
        if artifact.kind == "factors" and rank != recorded:
            field = "rank_pattern" if module in provenance.rank_pattern else "rank"
            raise IncompatibleArtifactError(
                f"module '{module}' has rank {rank}, the metadata field '{field}' says {recorded}",
                path=artifact.path,
                hint="the file is corrupt or was edited; re-run lorasb decompose",
            )
    return modules


Factor = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (B [m, r], R [r, r], A [r, n])


@dataclass
class Factors:
    """A factors file, or anything laid out like one: `factors` {module: (B, R, A)} in float32, `extra` the other
    tensors under their base state_dict names (a classifier head; every tensor of a full fine-tune), `config` the
    provenance."""

    path: Path
    config: dict
    factors: dict[str, Factor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return float(self.config.get("scale", 1.0))

    def check_fits(self, shapes: dict[str, tuple[int, ...]], model: str, hint: str) -> None:
        """Each module must be a linear layer in `shapes` ({module: weight shape}) of weight shape (B rows, A
        columns). `model` names the model in errors ("model 'x'", "the base model")."""
        check_fits(self.factors, shapes, model=model, path=str(self.path), hint=hint)


def check_fits(
    factors: dict[str, Factor], shapes: dict[str, tuple[int, ...]], *, model: str, path: str | None, hint: str | None
) -> None:
    """Every factor module must be in `shapes` ({module: weight shape}) with weight shape (B rows, A columns)."""
    for module, (lora_B, _, lora_A) in factors.items():
        want = (lora_B.shape[0], lora_A.shape[1])
        if module not in shapes:
            raise IncompatibleArtifactError(f"module '{module}' is not a linear layer of {model}", path=path, hint=hint)
        if tuple(shapes[module]) != want:
            raise IncompatibleArtifactError(
                f"factors of '{module}' are for a {want[0]}×{want[1]} weight, {model}'s is "
                f"{'×'.join(map(str, shapes[module]))}",
                path=path,
                hint=hint,
            )


def read_factors(artifact: Artifact) -> tuple[dict[str, Factor], dict[str, torch.Tensor]]:
    """(factors {module: (B, R, A)} in float32, the artifact's other tensors) of a factors/adapter artifact."""
    modules = factor_modules(artifact)
    # Copies owned in memory: a tensor read from safetensors is a view that pins a mapping of the whole file.
    tensors = {name: tensor.clone() for name, tensor in artifact.items()}
    for name, tensor in tensors.items():
        if _is_factor(name) and not tensor.is_floating_point():  # e.g. an R stored as int64 by hand
            raise IncompatibleArtifactError(
                f"tensor '{name}' is {str(tensor.dtype).removeprefix('torch.')}, not floating point",
                path=artifact.path,
                hint=f"re-create it with {PRODUCER[artifact.kind]}",
            )
    factors = {m: tuple(tensors.pop(f"{m}.{s}").float() for s in FACTOR_SUFFIXES) for m in modules}
    return factors, tensors


def check_extra(artifact_path: str, kind: str, extra: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse tensors besides the factors that the artifact's metadata does not account for (e.g. a `junk` tensor
    added with recomputed hashes, which merge would copy into the merged checkpoint)."""
    unexpected = sorted(set(extra) - set(allowed))
    if unexpected:
        raise IncompatibleArtifactError(
            f"unexpected tensor '{unexpected[0]}'"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""),
            path=artifact_path,
            hint=f"re-create it with {PRODUCER[kind]}",
        )


def load_factors(path: str | os.PathLike) -> Factors:
    """A factors file written by `lorasb decompose`."""
    artifact = Artifact(path, kinds=("factors",))
    factors, extra = read_factors(artifact)
    check_extra(artifact.path, artifact.kind, extra, artifact.provenance.head)  # a classifier's head only
    if not factors:
        raise IncompatibleArtifactError("factors file holds no modules", path=artifact.path, hint="re-run decompose")
    return Factors(path=Path(artifact.path), config=artifact.meta, factors=factors, extra=extra)


def load_update(artifact: Artifact, name: str) -> torch.Tensor:
    """ΔW_avg of one weight as float32: η·(stored signs)."""
    return artifact.get(name, torch.float32).mul_(artifact.meta["eta"])


def _is_factor(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in FACTOR_SUFFIXES


def _unreadable(path: str, error: Exception, kinds: tuple[str, ...] | None = None) -> BadInputError:
    """The error for a file safetensors cannot read: named by what it holds instead when that is another format."""
    found = foreign_format(Path(path))
    if found is not None:
        wanted = f"the file written by {PRODUCER[kinds[0]]}" if kinds else _ANY_ARTIFACT
        return BadInputError(f"not a lorasb artifact (safetensors) but {found}", path=path, hint=f"pass {wanted}")
    reason = (str(error).splitlines() or [type(error).__name__])[0]
    producer = PRODUCER[kinds[0]] if kinds else "the stage that wrote it"
    return BadInputError(
        f"not a readable safetensors file ({reason})",
        path=path,
        hint=f"the file is truncated or damaged; re-create it with {producer}",
    )


_ANY_ARTIFACT = "a file written by lorasb estimate, decompose or train, or a folder written by lorasb train or merge"
# Leading bytes of formats people pass by mistake, and what to call them.
_MAGIC = (
    (b"PK\x03\x04", "a zip archive, as PyTorch .bin/.pt checkpoints are"),
    (b"\x80", "a pickle"),
    (b"GGUF", "a GGUF model file"),
    (b"\x89PNG", "a PNG image"),
    (b"\x1f\x8b", "gzip-compressed data"),
)
_SNIFF_BYTES = 1 << 16
_MAX_SAFETENSORS_HEADER = 100_000_000  # bytes: the safetensors library's own limit
_JSON_PARSE_LIMIT = 1 << 24  # bytes: a JSON file larger than this is named by its first line only


def foreign_format(path: Path) -> str | None:
    """What `path` holds, by its first bytes, when it is not a safetensors file (an 8-byte little-endian header
    length, then the JSON header); None when it starts as one does (then it is truncated or damaged) or cannot be
    read."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
        size = os.path.getsize(path)
    except OSError:
        return None
    if 0 < int.from_bytes(head[:8], "little") <= _MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
        return None
    if not head:
        return "an empty file"
    found = next((what for magic, what in _MAGIC if head.startswith(magic)), None)
    if found is not None:
        return found
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:  # not a character cut at the end of the sniffed bytes
            return "binary data of another format"
        text = head[: e.start].decode("utf-8")
    if not text.lstrip().startswith(("{", "[")):
        return "a text file"
    return _json_format(path, text, size)


def _json_format(path: Path, head: str, size: int) -> str:
    """What a file that starts like JSON holds: lorasb evaluate's results, a config, JSON Lines or plain JSON."""
    try:
        value = json.loads(path.read_bytes()) if size <= _JSON_PARSE_LIMIT else None
    except (ValueError, RecursionError):
        value = None
    if value is None:
        first = head.lstrip().split("\n", 1)[0]
        try:
            return "JSON Lines, as data files are" if isinstance(json.loads(first), dict) else "JSON"
        except (ValueError, RecursionError):
            return "a text file that starts like JSON" if size <= _JSON_PARSE_LIMIT else "JSON"
    if not isinstance(value, dict):
        return f"a JSON {_json_type(value)}"
    if {"task", "metrics"} <= value.keys():
        return "the results JSON of lorasb evaluate"
    if "weight_map" in value:
        return "the JSON index of a sharded checkpoint (pass its folder)"
    if "peft_type" in value:
        return "a PEFT adapter config (pass its folder)"
    if "model_type" in value or "architectures" in value:
        return "a model's config.json (pass its folder)"
    return "a JSON object"


_UNVERIFIED_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("unverified_allowed", default=False)


@contextlib.contextmanager
def unverified_allowed(allowed: bool = True) -> Iterator[None]:
    """Within the block, artifacts without recorded hashes (written before lorasb recorded them) are read, as
    unverified; outside it they are refused. What `--allow-unverified` sets around a stage (`honours_allow_unverified`)."""
    token = _UNVERIFIED_ALLOWED.set(allowed)
    try:
        yield
    finally:
        _UNVERIFIED_ALLOWED.reset(token)


def honours_allow_unverified(stage):
    """Decorate a stage function whose config has `allow_unverified`: the stage runs in `unverified_allowed`."""

    @functools.wraps(stage)
    def run(config, *args, **kwargs):
        with unverified_allowed(config.allow_unverified):
            return stage(config, *args, **kwargs)

    return run


def content_digest(meta: dict) -> str | None:
    """A short hash of an artifact's tensors (its recorded sha256 per tensor): two files agree exactly when every
    tensor does. None for a file written before hashes were recorded."""
    hashes = meta.get(TENSOR_HASHES)
    if not isinstance(hashes, dict):
        return None
    return hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest()[:16]


def merged_from(model_dir: Path) -> dict:
    """What `lorasb merge` recorded in a merged checkpoint's safetensors metadata (`merged_from`: the adapter's
    base, template, system prompt and digest); {} for a checkpoint lorasb did not write. Reads one header only."""
    shard = next(iter(sorted(Path(model_dir).glob("*.safetensors"))), None)
    if shard is None:
        return {}
    metadata = shards.read_header(shard).get("__metadata__")  # a one-line error where unreadable
    raw = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    recorded = parse_metadata(raw, str(shard)).get("merged_from") if raw else None
    return recorded if isinstance(recorded, dict) else {}
