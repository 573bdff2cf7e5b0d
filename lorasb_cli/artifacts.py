"""lorasb artifact files (docs/design.md §2): safetensors tensors + the `lorasb` metadata JSON, read and written.

Kinds: `update` (int8 signs of −G, scale η in metadata), `update-raw` (float32 sums of G and a sample count),
`factors` (B, R, A per module) and `adapter`. Writes are atomic (files.py); reads never unpickle.

Every read goes through one schema (`read_provenance`): size and nesting limits before the JSON is parsed, then
the envelope (format, version, kind), then each field of the kind's typed metadata (metadata.py), then integrity.
An artifact records the sha256 of each tensor (dtype, shape and bytes; `shards.tensor_hash`) under
`tensor_sha256` and of the rest of its metadata under `metadata_sha256`; `Artifact.get`/`items` check each tensor
as they read it. Artifacts written before hashes were recorded still load, unverified.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import functools
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import files, metadata, shards
from .errors import BadInputError, IncompatibleArtifactError, NonFiniteError
from .metadata import PRODUCER, TENSOR_HASHES

METADATA_KEY = "lorasb"
FACTOR_SUFFIXES = ("lora_B", "lora_R", "lora_A")

# Checked before parsing: a corrupt or hostile header must cost neither memory nor recursion. The size allows
# for fields that grow with the model (each tensor's hash, each module's energy), so huge MoE models fit.
MAX_METADATA_BYTES = 1_000_000
METADATA_BYTES_PER_TENSOR = 256
MAX_METADATA_DEPTH = 32


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


def write_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: metadata.ArtifactMeta) -> Path:
    """Write `tensors` with the metadata `meta`, its envelope and the tensors' hashes atomically; returns the final
    path.

    The metadata is validated first by the reader's schema: no stage writes a file a later stage refuses."""
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    for name, tensor in contiguous.items():
        check_finite(name, tensor, str(path))
    fields = recorded_fields(meta)
    text = metadata.seal({**fields, TENSOR_HASHES: {name: shards.tensor_hash(t) for name, t in contiguous.items()}})
    try:
        read_provenance(text, str(path), list(contiguous))
    except IncompatibleArtifactError as e:
        raise BadInputError(
            f"refusing to write an artifact whose {e.message}",
            path=str(path),
            hint="check the option that sets it (e.g. --eta must be a finite number > 0)",
        ) from None
    header = {"format": "pt", METADATA_KEY: text}
    with files.atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=header)
    return Path(path)


def recorded_fields(meta: metadata.ArtifactMeta) -> dict:
    """The JSON object an artifact records for `meta` (before its hashes): format, kind, versions and time."""
    return metadata.envelope(meta, library_versions(), dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def check_finite(name: str, tensor: torch.Tensor, path: str | None = None) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise NonFiniteError(f"NaN/Inf in tensor '{name}'", path=path, hint="recompute it in float32")


_STRINGS = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.DOTALL)  # possessive: linear even on hostile input
_BRACKETS = re.compile(r"[\[\]{}]")


def read_provenance(
    text: str, path: str, names: Sequence[str], kinds: tuple[str, ...] | None = None
) -> tuple[dict, metadata.ArtifactMeta]:
    """Parse and validate the `lorasb` metadata of the artifact at `path`, whose tensors are `names`: (the JSON
    object as written, its typed metadata). `kinds`: the kinds the caller accepts. Every violation is one
    IncompatibleArtifactError naming the file and the field."""
    fields = parse_metadata(text, path, MAX_METADATA_BYTES + METADATA_BYTES_PER_TENSOR * len(names))
    return fields, metadata.read_artifact(fields, path, names, kinds, unverified_ok=_UNVERIFIED_ALLOWED.get())


def parse_metadata(text: object, path: str, limit: int = MAX_METADATA_BYTES) -> dict:
    """The JSON object in a `lorasb` metadata string, refused (one line naming `path`) when over `limit` bytes,
    nested deeper than MAX_METADATA_DEPTH, not JSON or not an object."""
    hint = metadata.producer_hint(None)
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
        fields = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints past Python's 4300-digit limit
        raise IncompatibleArtifactError(f"lorasb metadata is not valid JSON ({e})", path=path, hint=hint) from None
    if not isinstance(fields, dict):
        raise IncompatibleArtifactError(
            f"lorasb metadata is a JSON {metadata.json_type(fields)}, not an object", path=path, hint=hint
        )
    return fields


def _json_depth(text: str) -> int:
    """How deep arrays and objects nest in `text`, without parsing it (so without recursion)."""
    steps = (1 if c in "[{" else -1 for c in _BRACKETS.findall(_STRINGS.sub("", text)))
    return max(itertools.accumulate(steps), default=0)


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
        # `fields`: the JSON object as written (what inspect shows); `meta`: its typed metadata, what stages read.
        self.fields, self.meta = read_provenance(header[METADATA_KEY], self.path, self.names, kinds)
        self.kind: str = self.meta.KIND
        self.hashes: dict[str, str] | None = self.meta.tensor_sha256  # None: written before hashes
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
        meta = artifact.meta
        if isinstance(meta, metadata.FactorsMeta) and rank != meta.rank_of(module):
            recorded = meta.rank_of(module)
            field = "rank_pattern" if module in meta.rank_pattern else "rank"
            raise IncompatibleArtifactError(
                f"module '{module}' has rank {rank}, the metadata field '{field}' says {recorded}",
                path=artifact.path,
                hint="the file is corrupt or was edited; re-run lorasb decompose",
            )
    return modules


ModuleFactors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # one module's (B [m, r], R [r, r], A [r, n])


@dataclass
class FactorsFile:
    """A factors file, or anything laid out like one (adapter.Adapter): `factors` {module: (B, R, A)} in float32,
    `extra` the other tensors under their base state_dict names (a classifier head; every tensor of a full
    fine-tune), `meta` its typed metadata and `fields` the JSON object as written."""

    path: Path
    meta: metadata.FactorsMeta | metadata.AdapterMeta
    fields: dict
    factors: dict[str, ModuleFactors]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.meta.scale

    def check_fits(self, shapes: dict[str, tuple[int, ...]], model: str, hint: str) -> None:
        """Each module must be a linear layer in `shapes` ({module: weight shape}) of weight shape (B rows, A
        columns). `model` names the model in errors ("model 'x'", "the base model")."""
        check_fits(self.factors, shapes, model=model, path=str(self.path), hint=hint)


def check_fits(
    factors: dict[str, ModuleFactors],
    shapes: dict[str, tuple[int, ...]],
    *,
    model: str,
    path: str | None,
    hint: str | None,
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


def read_factors(artifact: Artifact) -> tuple[dict[str, ModuleFactors], dict[str, torch.Tensor]]:
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


def load_factors(path: str | os.PathLike) -> FactorsFile:
    """A factors file written by `lorasb decompose`."""
    artifact = Artifact(path, kinds=("factors",))
    factors, extra = read_factors(artifact)
    check_extra(artifact.path, artifact.kind, extra, artifact.meta.head)  # a classifier's head only
    if not factors:
        raise IncompatibleArtifactError("factors file holds no modules", path=artifact.path, hint="re-run decompose")
    return FactorsFile(Path(artifact.path), artifact.meta, artifact.fields, factors, extra)


def load_update(artifact: Artifact, name: str) -> torch.Tensor:
    """ΔW_avg of one weight as float32: η·(stored signs)."""
    return artifact.get(name, torch.float32).mul_(artifact.meta.eta)


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
        return f"a JSON {metadata.json_type(value)}"
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


def merged_from(model_dir: Path) -> metadata.MergedMeta:
    """What `lorasb merge` recorded in a merged checkpoint's safetensors metadata (the adapter's base, template,
    system prompt and digest); empty for a checkpoint lorasb did not write. Reads one header only."""
    shard = next(iter(sorted(Path(model_dir).glob("*.safetensors"))), None)
    if shard is None:
        return metadata.MergedMeta()
    header = shards.read_header(shard).get("__metadata__")  # a one-line error where unreadable
    raw = header.get(METADATA_KEY) if isinstance(header, dict) else None
    if raw is None:
        return metadata.MergedMeta()
    return metadata.MergedMeta.from_json(
        parse_metadata(raw, str(shard)), path=str(shard), hint=metadata.producer_hint(None)
    )
