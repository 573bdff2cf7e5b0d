"""The typed metadata of every lorasb artifact (docs/design.md §2): one frozen dataclass per kind, whose checks
are generated from its field declarations, as lorasb_cli/options.py generates click options from a config's.

- `BaseIdentity`: the model an artifact was made on (`base_model`); `DataProvenance`: the rows it was made
  from (`data`: source, digest, sampling, template, system prompt).
- One class per kind: `UpdateMeta` (`update`), `RawShardMeta` (`update-raw`), `FactorsMeta` (`factors`),
  `AdapterMeta` (`adapter`), and `MergedMeta`, the `lorasb` entry in a merged checkpoint's weight files.
- A field is declared once, with `recorded(...)`: its JSON key is its name, its annotation is the check
  (`str`, `int`, `float`, `tuple[str, ...]`, `dict`, a nested record, `X | None` where null or absence is
  allowed), `range` bounds a number, a field without a default is required. `from_json` checks and converts;
  `to_json` writes. Keys a class does not declare (a plug-in's own settings, fields of a newer lorasb) are
  kept in `extra` and written back as they were.
- An artifact's metadata is derived from its inputs' by a constructor (`FactorsMeta.from_update`,
  `AdapterMeta.from_run`, `MergedMeta.from_adapter`, `UpdateMeta.from_shards`), never by copying keys.

Adding a field: declare it on the class of each kind that records it (or on `ArtifactMeta`/`DataProvenance`
when every kind does), and set it in that class's constructor. Nothing else reads or checks keys.

This module imports neither torch nor any stage: every stage reads its inputs through it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

from .errors import IncompatibleArtifactError
from .options import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range

FORMAT_VERSION = 1
TENSOR_HASHES = "tensor_sha256"
METADATA_HASH = "metadata_sha256"
CORRUPT_HINT = "the file is corrupt or was edited; re-create it with {producer}"

# Which command writes each kind: named in errors when a stage gets the wrong file.
PRODUCER = {
    "update": "lorasb estimate (or lorasb combine)",
    "update-raw": "lorasb estimate --raw",
    "factors": "lorasb decompose",
    "adapter": "lorasb train",
}
KINDS = tuple(PRODUCER)


def recorded(default: Any = dataclasses.MISSING, *, range: Range | None = None, check=None, omit_empty=False):
    """A metadata field. No `default`: required. `range`: the values a number may take. `check`: (what it must
    be, predicate) for a value the annotation cannot say (e.g. `[i, n]`). `omit_empty`: not written while None
    or empty (fields only some artifacts of a kind have: a classifier's head, --budget's allocation)."""
    spec = {"range": range, "check": check, "omit_empty": omit_empty}
    if isinstance(default, (dict, list)) and default:
        raise TypeError("a mutable default is shared by every record: only {} (a fresh one each) is allowed")
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"meta": spec})
    return field(default=default, metadata={"meta": spec})


class _Reader:
    """Checks one JSON object against a record class; every failure names the file and the field's key."""

    def __init__(self, path: str | None, hint: str):
        self.path, self.hint = path, hint

    def fail(self, key: str, problem: str, hint: str | None = None) -> NoReturn:
        raise IncompatibleArtifactError(f"metadata field '{key}' {problem}", path=self.path, hint=hint or self.hint)

    def record(self, cls: type[Record], obj: dict, prefix: str = "") -> Record:
        values, hints = {}, _hints(cls)
        for f in _fields(cls):
            key = prefix + f.name
            if f.name not in obj:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    self.fail(key, f"is missing; it must be {_want(hints[f.name], f.metadata['meta'])}")
                continue
            values[f.name] = self.value(key, obj[f.name], hints[f.name], f.metadata["meta"])
        extra = {k: v for k, v in obj.items() if k not in values and k not in _names(cls)}
        made = cls(**values, extra=extra)
        made.check(self, prefix)
        return made

    def value(self, key: str, value: Any, hint: Any, spec: dict) -> Any:
        if spec["check"] is not None:
            want, ok = spec["check"]
            if value is not None and not ok(value):
                self.fail(key, f"is {show(value)}; it must be {want}")
            return value
        options = [h for h in _members(hint) if h is not type(None)]
        if value is None and len(options) < len(_members(hint)):
            return None
        for option in options:
            converted = _convert(value, option, spec["range"])
            if converted is not _REFUSED:
                return self.record(option, value, f"{key}.") if _is_record(option) else converted
        self.fail(key, f"is {show(value)}; it must be {_want(hint, spec)}")


_REFUSED = object()


def _convert(value: Any, hint: Any, bounds: Range | None) -> Any:
    """`value` as `hint` holds it, or _REFUSED; a record is only checked to be an object here."""
    origin = typing.get_origin(hint) or hint
    if hint is str:
        return value if isinstance(value, str) else _REFUSED
    if hint is int:
        ok = is_int(value) and (bounds is None or value in bounds)
        return value if ok else _REFUSED
    if hint is float:
        ok = is_number(value) and math.isfinite(value) and (bounds is None or value in bounds)
        return float(value) if ok else _REFUSED
    if origin is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value)
        return tuple(value) if ok else _REFUSED
    if origin is dict:
        if not isinstance(value, dict):
            return _REFUSED
        args = typing.get_args(hint)
        if args and not all(_convert(v, args[1], bounds) is not _REFUSED for v in value.values()):
            return _REFUSED
        return value
    if _is_record(hint):
        return value if isinstance(value, dict) else _REFUSED
    raise TypeError(f"no metadata check for {hint}")


def _want(hint: Any, spec: dict) -> str:
    """What a field's value must be, as its errors say: "an integer ≥ 1", "a string or a list of strings"."""
    if spec.get("check") is not None:
        return spec["check"][0]
    bounds = spec.get("range")
    wants = []
    for option in _members(hint):
        origin = typing.get_origin(option) or option
        if option is type(None):
            continue
        if option is int:
            wants.append("an integer" + (f" {bounds}" if bounds else ""))
        elif option is float:
            wants.append("a finite number" + (f" {bounds}" if bounds else ""))
        elif option is str:
            wants.append("a string")
        elif origin is tuple:
            wants.append("a list of strings")
        elif origin is dict and typing.get_args(option):
            wants.append(f"an object mapping each key to {_want(typing.get_args(option)[1], {'range': bounds})}")
        else:
            wants.append("an object")
    return " or ".join(wants)


def _members(hint: Any) -> tuple:
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Record)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "meta" in f.metadata]


@functools.cache
def _names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in _fields(cls))


@dataclass(frozen=True, kw_only=True)
class Record:
    """Base of every metadata record: declared fields, and `extra`, the keys it does not declare, kept as read."""

    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: dict, *, path: str | None = None, hint: str = "") -> typing.Self:
        """The record of the JSON object `obj`, checked field by field in declaration order; the first violation
        is one IncompatibleArtifactError naming `path`, the field and what it must be."""
        return _Reader(path, hint).record(cls, obj)

    def to_json(self) -> dict:
        """The JSON object this record is written as: its fields under their names (nested records as objects),
        then the keys it kept in `extra`."""
        out = {}
        for f in _fields(type(self)):
            value = getattr(self, f.name)
            if f.metadata["meta"]["omit_empty"] and value in (None, (), {}):
                continue
            out[f.name] = value.to_json() if isinstance(value, Record) else _plain(value)
        return {**self.extra, **out}

    def check(self, reader: _Reader, prefix: str) -> None:
        """Rules across fields; none here."""


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True, kw_only=True)
class BaseIdentity(Record):
    """`base_model`: the model an artifact was made on. `id` (a path or hub id) is for people; stages match
    the `fingerprint` of its target modules' names and shapes, and apply an artifact only to the checkpoint of
    its `weights_digest` (models.check_base)."""

    id: str = recorded()
    fingerprint: str = recorded()
    weights_digest: str | None = recorded(None)
    source: dict | None = recorded(None, omit_empty=True)  # a bundled model's package, version, file hash
    quantization: str | None = recorded(None, omit_empty=True)  # --quantize the artifact was made under


def _is_shard(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(is_int(x) for x in value) and 0 <= value[0] < value[1]


@dataclass(frozen=True, kw_only=True)
class DataProvenance(Record):
    """`data`: the rows an artifact was made from. Where they came from (`source`, a path for people; `digest`
    of the rows, what stages compare), how the sample was drawn (estimate: `drawn` of `rows` by `frac` or
    `--samples`, `seed`, `shard` [i, n] of `estimate --shard`, `combined_from` shards), and how prompts were
    written (`format`, `template`, `system_prompt`). A built-in set adds its package, version and generator
    (in `extra`)."""

    source: str | None = recorded(None, omit_empty=True)
    split: str | None = recorded(None, omit_empty=True)
    rows: int | None = recorded(None, range=NON_NEGATIVE, omit_empty=True)
    digest: str | None = recorded(None, omit_empty=True)
    format: str | None = recorded(None, omit_empty=True)
    template: str | None = recorded(None)
    system_prompt: str | None = recorded(None)
    # How estimate drew its sample (written whole, nulls included, where it drew one: `to_json`).
    drawn: int | None = recorded(None, range=NON_NEGATIVE, omit_empty=True)
    frac: float | None = recorded(None, omit_empty=True)
    min_samples: int | None = recorded(None, omit_empty=True)
    seed: int | None = recorded(None, omit_empty=True)
    shard: list | None = recorded(None, check=("[i, n] with 0 ≤ i < n", _is_shard), omit_empty=True)
    max_length: int | None = recorded(None, omit_empty=True)
    combined_from: int | None = recorded(None, omit_empty=True)

    # What every raw shard of one estimate shares for their sum to be that estimate: the rows, how they were drawn
    # and prompted, never where they were read from. `config`: a built-in set's generator settings (in `extra`).
    SAMPLING: ClassVar[tuple[str, ...]] = (
        "digest", "split", "config", "format", "template", "system_prompt", "drawn", "frac", "seed", "max_length"
    )  # fmt: skip

    DRAWN: ClassVar[tuple[str, ...]] = ("drawn", "frac", "min_samples", "seed", "shard", "max_length")

    def to_json(self) -> dict:
        out = super().to_json()
        if self.drawn is not None:  # estimate's sample: every field of the draw, as estimate always wrote them
            out |= {name: getattr(self, name) for name in self.DRAWN}
        return out

    @classmethod
    def from_dataset(cls, dataset, **drawn) -> DataProvenance:
        """The provenance of `dataset` (a data.Dataset: source, split, rows, digest, a built-in set's package and
        generator) and of how it was drawn and prompted (`drawn`: format, template, sampling fields)."""
        own = {"source": dataset.source, "split": dataset.split, "rows": len(dataset.rows), "digest": dataset.digest}
        return cls(**own, **drawn, extra=dict(dataset.extra))

    def sampling(self) -> dict[str, Any]:
        """The SAMPLING fields by name (None where not recorded)."""
        return {name: getattr(self, name) if name in _names(type(self)) else self.extra.get(name) for name in
                self.SAMPLING}  # fmt: skip

    def whole(self, shards: int) -> DataProvenance:
        """The provenance of the sum of `shards` raw shards of this sample."""
        return dataclasses.replace(self, shard=None, combined_from=shards)


@dataclass(frozen=True, kw_only=True)
class ArtifactMeta(Record):
    """What every artifact records: its base model first (errors name it before anything else), then where it
    came from. `kind`, `format`, `format_version` and the hashes are the file's envelope (artifacts.py)."""

    KIND: ClassVar[str]

    base_model: BaseIdentity = recorded()
    targets: str | tuple[str, ...] | None = recorded(None)
    method: str | None = recorded(None, omit_empty=True)
    init: str | None = recorded(None, omit_empty=True)  # decompose --init
    eta: float | None = recorded(None, range=POSITIVE, omit_empty=True)  # ΔW = η·signs of the update
    data: DataProvenance | None = recorded(None)
    samples: int | None = recorded(None, range=NON_NEGATIVE, omit_empty=True)
    seed: int | None = recorded(None, omit_empty=True)
    # A sequence classifier's head: the class that rebuilds it, its labels, its trained tensors (models.HeadSpec).
    architecture: str | None = recorded(None, omit_empty=True)
    labels: tuple[str, ...] | None = recorded(None, omit_empty=True)
    head: tuple[str, ...] = recorded((), omit_empty=True)
    versions: dict[str, str] | None = recorded(None, omit_empty=True)
    created: str | None = recorded(None, omit_empty=True)
    # The sha256 of each tensor, as the file records it (None: written before lorasb recorded hashes).
    tensor_sha256: dict[str, str] | None = recorded(None, omit_empty=True)
    # A field every kind records goes here; one that describes the base it was made on goes on BaseIdentity (as
    # `--quantize`'s `quantization`), and one only some kinds record on their classes.

    def check(self, reader: _Reader, prefix: str) -> None:
        if self.labels is not None and self.architecture is None:
            # merge and evaluate rebuild the classifier from both: its class and its labels.
            reader.fail("architecture", "is missing beside 'labels'; it must be the classifier's class name")

    def content_digest(self) -> str | None:
        """A short hash of the artifact's tensors: two files agree exactly when every tensor does. None for a file
        written before hashes were recorded."""
        if self.tensor_sha256 is None:
            return None
        return hashlib.sha256(json.dumps(sorted(self.tensor_sha256.items())).encode()).hexdigest()[:16]

    @property
    def template(self) -> str | None:
        return self.data.template if self.data is not None else None


@dataclass(frozen=True, kw_only=True)
class UpdateMeta(ArtifactMeta):
    """`update`: the int8 signs of −G per target weight, ΔW = η·signs (estimate, combine)."""

    KIND: ClassVar[str] = "update"

    targets: str | tuple[str, ...] = recorded()
    eta: float = recorded(range=POSITIVE)
    tokens: int | None = recorded(None, range=NON_NEGATIVE)
    dtype: str | None = recorded(None)  # the model's dtype while G was summed
    stability: dict | None = recorded(None, omit_empty=True)  # --report-ranks
    samples_auto: dict | None = recorded(None, omit_empty=True)  # --samples auto

    @classmethod
    def from_shards(cls, shards: list[RawShardMeta]) -> UpdateMeta:
        """The update that sums `shards` (checked alike with `RawShardMeta.same_estimate`)."""
        first = shards[0]
        return cls(
            base_model=first.base_model,
            targets=first.targets,
            method=first.method,
            data=first.data.whole(len(shards)),
            samples=sum(s.samples for s in shards),
            tokens=sum(s.tokens for s in shards),
            seed=first.seed,
            eta=first.eta,
            dtype=first.dtype,
            architecture=first.architecture,
            labels=first.labels,
            head=first.head,
        )


@dataclass(frozen=True, kw_only=True)
class RawShardMeta(UpdateMeta):
    """`update-raw`: float32 sums of G and their counts (estimate --raw), which combine sums across shards."""

    KIND: ClassVar[str] = "update-raw"

    method: str = recorded()
    data: DataProvenance = recorded()
    samples: int = recorded(range=NON_NEGATIVE)
    tokens: int = recorded(range=NON_NEGATIVE)
    seed: int = recorded()
    dtype: str = recorded()


@dataclass(frozen=True, kw_only=True)
class FactorsMeta(ArtifactMeta):
    """`factors`: B, R, A per module (decompose). An init's own options are kept in `extra`."""

    KIND: ClassVar[str] = "factors"

    method: str | None = recorded(None)
    init: str | None = recorded(None)
    eta: float | None = recorded(None, range=POSITIVE)  # None: a weight-based init (no update)
    samples: int | None = recorded(None, range=NON_NEGATIVE)  # the update's; None for a weight-based init
    rank: int = recorded(range=AT_LEAST_1)
    rank_pattern: dict[str, int] = recorded({}, range=AT_LEAST_1, omit_empty=True)  # modules not at `rank`
    budget: dict | None = recorded(None, omit_empty=True)  # decompose --budget's allocation
    scale: float = recorded(1.0)
    svd: dict | None = recorded(None)
    energy: dict[str, float] | None = recorded(None)

    @classmethod
    def from_update(cls, update: UpdateMeta | None, *, base_model: BaseIdentity, targets, **decomposed) -> FactorsMeta:
        """The factors of `update` (None: of a model's weights, `base_model` and `targets` alone); `decomposed`
        are decompose's own fields (init, rank, scale, svd, energy, ...); an init's options go in `extra`."""
        own = {k: decomposed.pop(k) for k in list(decomposed) if k not in _names(cls)}
        inherited = {}
        if update is not None:
            inherited = {name: getattr(update, name) for name in ("eta", "data", "samples")}
            inherited |= {name: getattr(update, name) for name in ("architecture", "labels", "head")}
        return cls(base_model=base_model, targets=targets, method="lorasb", **inherited, **decomposed, extra=own)

    def rank_of(self, module: str) -> int:
        return self.rank_pattern.get(module, self.rank)


@dataclass(frozen=True, kw_only=True)
class AdapterMeta(ArtifactMeta):
    """`adapter`: a trained adapter (train), also written as adapter_config.json. The method's own settings (e.g.
    init_scale, alpha) are kept in `extra`."""

    KIND: ClassVar[str] = "adapter"

    method: str | None = recorded(None)
    target_modules: tuple[str, ...] | None = recorded(None, omit_empty=True)
    rank: int | None = recorded(None, range=AT_LEAST_1)  # None: a method without rank (full fine-tuning)
    rank_pattern: dict[str, int] = recorded({}, range=AT_LEAST_1, omit_empty=True)
    scale: float = recorded(1.0)
    train: dict | None = recorded(None, omit_empty=True)  # train's options (compared on --resume)
    init_adapter: dict | None = recorded(None, omit_empty=True)  # the run R started from (--init-adapter)
    lr_auto: float | None = recorded(None, range=POSITIVE, omit_empty=True)  # the rate `--lr auto` picked

    @classmethod
    def from_run(
        cls, start: FactorsMeta | AdapterMeta | None, *, settings: dict, continues: str | None = None, **run
    ) -> AdapterMeta:
        """The adapter of a run that started from `start` (factors, or with `continues` the path of a trained
        adapter; None for a method that needs neither), whose targets and rank pattern it keeps. `settings`: the
        method's own (its declared fields, such as init, eta, scale, set those; the rest go in `extra`). `run`: the
        fields train knows (base_model, targets, target_modules, rank, method, data, train, the head)."""
        if start is not None:  # the modules R lives in are the factors'
            run |= {"targets": start.targets, "rank_pattern": start.rank_pattern}
        if continues is not None:
            started = {"data": start.data.to_json() if start.data else None, "train": None, "init_adapter": None}
            if isinstance(start, AdapterMeta):
                started |= {"train": start.train, "init_adapter": start.init_adapter}
            run["init_adapter"] = {"path": continues, **started}
        declared = {k: v for k, v in settings.items() if k in _names(cls)}
        return cls(**run, **declared, extra={k: v for k, v in settings.items() if k not in declared})


@dataclass(frozen=True, kw_only=True)
class MergedFrom(Record):
    """`merged_from`: what merge put into a checkpoint: the adapter's base, rank, method and prompting, and the
    digest of its tensors, so the same adapter is never merged twice."""

    base_model: BaseIdentity | None = recorded(None)
    rank: int | None = recorded(None)
    method: str | None = recorded(None)
    template: str | None = recorded(None)
    system_prompt: str | None = recorded(None)
    adapter_digest: str | None = recorded(None)


@dataclass(frozen=True, kw_only=True)
class MergedMeta(Record):
    """The `lorasb` entry of every weight file of a merged checkpoint (merge)."""

    merged_from: MergedFrom | None = recorded(None)
    base_model: str | None = recorded(None)  # the id merged into
    lorasb_version: str | None = recorded(None)

    @classmethod
    def from_adapter(cls, adapter: AdapterMeta, *, base_id: str, version: str) -> MergedMeta:
        prompting = adapter.data or DataProvenance()
        merged = MergedFrom(
            base_model=adapter.base_model,
            rank=adapter.rank,
            method=adapter.method,
            template=prompting.template,  # evaluate prompts the merged model as the adapter was trained
            system_prompt=prompting.system_prompt,
            adapter_digest=adapter.content_digest(),
        )
        return cls(merged_from=merged, base_model=base_id, lorasb_version=version)

    def prompting(self) -> DataProvenance:
        """The template and system prompt the merged adapter was trained with (none for a plain model)."""
        merged = self.merged_from or MergedFrom()
        return DataProvenance(template=merged.template, system_prompt=merged.system_prompt)


KIND_CLASSES: dict[str, type[ArtifactMeta]] = {
    cls.KIND: cls for cls in (UpdateMeta, RawShardMeta, FactorsMeta, AdapterMeta)
}


def producer_hint(kind: str | None) -> str:
    return CORRUPT_HINT.format(producer=PRODUCER[kind] if kind else "the lorasb stage that wrote it")


def read_artifact(
    fields: dict, path: str, names: typing.Sequence[str], kinds: tuple[str, ...] | None, *, unverified_ok: bool
) -> ArtifactMeta:
    """The typed metadata of the artifact at `path` whose tensors are `names`, from its parsed `lorasb` JSON:
    the envelope first (format, version, kind: one of `kinds`, None for any), then the fields of the kind's
    class, then the hashes (a file without any is refused unless `unverified_ok`). The first violation is raised,
    so a file with several always gets the same error."""
    _check_format(fields, path)
    kind = _check_kind(fields, path, kinds)
    meta = read_meta(fields, path, names)
    hashes = _check_integrity(fields, path, names, producer_hint(kind), unverified_ok)
    return dataclasses.replace(meta, tensor_sha256=hashes)


def read_meta(fields: dict, path: str | None, names: typing.Sequence[str] | None = None) -> ArtifactMeta:
    """The typed metadata of an artifact whose envelope is known good: the class of its `kind`, each field
    checked; with `names` (the file's tensors) the head must name tensors it holds."""
    cls = KIND_CLASSES[fields["kind"]]
    hint = producer_hint(cls.KIND)
    envelope = {"format", "format_version", "kind", TENSOR_HASHES, METADATA_HASH}
    meta = cls.from_json({k: v for k, v in fields.items() if k not in envelope}, path=path, hint=hint)
    missing = [name for name in meta.head if names is not None and name not in names]
    if missing:
        _Reader(path, hint).fail("head", f"names tensor '{missing[0]}', which the file does not hold")
    return meta


def _check_format(fields: dict, path: str) -> None:
    """`format` must be "lorasb" and `format_version` one this lorasb reads (≤ FORMAT_VERSION)."""
    reader = _Reader(path, producer_hint(None))
    if fields.get("format") != "lorasb":
        found = show(fields["format"]) if "format" in fields else "missing"
        reader.fail(
            "format",
            f'is {found}, not "lorasb": this is no lorasb artifact',
            hint="pass a file written by lorasb (estimate, decompose or train)",
        )
    if "format_version" not in fields:
        reader.fail("format_version", "is missing; it must be an integer ≥ 1")
    version = reader.value("format_version", fields["format_version"], int, {"range": AT_LEAST_1, "check": None})
    if version > FORMAT_VERSION:
        raise IncompatibleArtifactError(
            f"artifact format version {version} is newer than this lorasb reads ({FORMAT_VERSION})",
            path=path,
            hint="upgrade lorasb",
        )


def _check_kind(fields: dict, path: str, kinds: tuple[str, ...] | None) -> str:
    """`kind`, one of `kinds` (None: any)."""
    kind = fields.get("kind")
    if kind not in KINDS:
        found = f"is {show(kind)}" if "kind" in fields else "is missing"
        _Reader(path, producer_hint(None)).fail("kind", f"{found}; it must be one of {', '.join(KINDS)}")
    if kinds is not None and kind not in kinds:
        raise IncompatibleArtifactError(
            f"expected a {' or '.join(kinds)} artifact, got a {kind}",
            path=path,
            hint=f"pass the file written by {PRODUCER[kinds[0]]}",
        )
    return kind


def _check_integrity(
    fields: dict, path: str, names: typing.Sequence[str], hint: str, unverified_ok: bool
) -> dict[str, str] | None:
    """The recorded hashes: one per tensor (exactly the file's tensors), and one of the other fields. None for a
    file without any (written before lorasb recorded hashes), where `unverified_ok`."""
    from .shards import is_hash  # imports torch: only a reader of tensors pays for it

    if TENSOR_HASHES not in fields and METADATA_HASH not in fields:
        if unverified_ok:
            return None
        # Written before lorasb recorded hashes, or stripped of them: nothing stands guard over its tensors.
        raise IncompatibleArtifactError(
            "the file records no hashes of its tensors, so they cannot be verified",
            path=path,
            hint="re-create it with the lorasb stage that wrote it, or pass --allow-unverified to read it anyway",
        )
    reader = _Reader(path, hint)
    # One without the other is a damaged file.
    hashes = fields.get(TENSOR_HASHES)
    if not (isinstance(hashes, dict) and all(is_hash(h) for h in hashes.values())):
        found = f"is {show(hashes)}" if TENSOR_HASHES in fields else "is missing"
        reader.fail(TENSOR_HASHES, f"{found}; it must be an object mapping each tensor to its sha256 prefix")
    digest = fields.get(METADATA_HASH)
    if not is_hash(digest):
        found = f"is {show(digest)}" if METADATA_HASH in fields else "is missing"
        reader.fail(METADATA_HASH, f"{found}; it must be a sha256 prefix")
    odd = sorted(set(names) ^ hashes.keys())
    if odd and odd[0] in names:
        reader.fail(TENSOR_HASHES, f"records no hash of tensor '{odd[0]}', which the file holds")
    if odd:
        reader.fail(TENSOR_HASHES, f"names tensor '{odd[0]}', which the file does not hold")
    if _metadata_digest({k: v for k, v in fields.items() if k != METADATA_HASH}) != digest:
        raise IncompatibleArtifactError(
            "lorasb metadata does not match the hash recorded when it was written", path=path, hint=hint
        )
    return hashes


def seal(fields: dict) -> str:
    """`fields` as the JSON written to a file, with the hash of its other fields under METADATA_HASH."""
    body = json.loads(json.dumps({k: v for k, v in fields.items() if k != METADATA_HASH}))  # as a reader parses it
    return json.dumps({**body, METADATA_HASH: _metadata_digest(body)}, sort_keys=True)


def _metadata_digest(body: dict) -> str:
    from .shards import HASH_HEX_DIGITS  # as long as a tensor's hash

    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:HASH_HEX_DIGITS]


def described(fields: dict) -> ArtifactMeta | MergedMeta | None:
    """The typed view of metadata already read (inspect's `provenance`): an artifact's, a merged checkpoint's, or
    None for what lorasb did not write (a PEFT or model config)."""
    if fields.get("kind") in KIND_CLASSES:
        return read_meta(fields, None)
    if "merged_from" in fields:
        return MergedMeta.from_json(fields)
    return None


def adapter_config(fields: object) -> AdapterMeta | None:
    """The metadata in a parsed adapter_config.json (train writes one beside every adapter, in every checkpoint);
    None when it holds no adapter's. A field of the wrong type is an IncompatibleArtifactError."""
    if not isinstance(fields, dict) or fields.get("kind") != AdapterMeta.KIND:
        return None
    return read_meta(fields, None)


def envelope(meta: ArtifactMeta, versions: dict[str, str], created: str) -> dict:
    """The JSON object an artifact's file records (before its hashes): format, version, kind, then `meta`."""
    body = dataclasses.replace(meta, versions=versions, created=created, tensor_sha256=None).to_json()
    return {**body, "format": "lorasb", "format_version": FORMAT_VERSION, "kind": meta.KIND}


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {list: "array", dict: "object", str: "string"}.get(type(value), "number")


def show(value: object) -> str:
    """A value as an error names it: numbers and short strings as they are, anything else by its JSON type."""
    if is_number(value):
        return repr(value)
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40])}" + ("…" if len(value) > 40 else "")
    return "null" if value is None else f"a JSON {json_type(value)}"
