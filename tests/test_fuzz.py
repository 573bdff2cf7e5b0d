"""Fuzzing every artifact loader (issue 15, item 8): valid updates, factors and adapters, truncated, with bytes
flipped in header and data, with a dtype changed at the same byte size, and with their metadata rewritten.

The property, for every loader: the file is rejected with one line (a LorasbError, exit 2, no newline), or it
is accepted and every tensor read equals the original exactly. Never another exception (a traceback), never a
hang. Examples are derandomized and bounded, so the file runs in seconds and the same way on every machine.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from datetime import timedelta

import pytest
import torch
from helpers import artifact_meta
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lorasb_cli import adapter, artifacts, inspect
from lorasb_cli.errors import BadInputError, LorasbError

# The deadline guards against a loader that turns slow or loops on some input (each example takes
# milliseconds); it is far above any machine's speed, so it asserts nothing about timing.
FUZZ = settings(
    max_examples=40,
    deadline=timedelta(seconds=10),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)

HEAD = {"classifier.weight": (3, 6), "classifier.bias": (3,)}
MODULES = {"layer.0.q": (8, 6), "layer.0.o": (6, 8)}
RANK = 2


def _base_meta() -> dict:
    return {
        "base_model": {"id": "toy", "fingerprint": "0" * 16},
        "targets": "all-linear",
        "method": "lorasb",
        "labels": ["a", "b", "c"],
        "head": sorted(HEAD),
        "architecture": "ToyForClassification",
    }


def _build(folder) -> dict[str, dict]:
    """One valid artifact of each kind: its path, bytes, tensors, and the loaders that read it."""
    gen = torch.Generator().manual_seed(0)
    head = {name: torch.randn(shape, generator=gen) for name, shape in HEAD.items()}
    signs = {f"{m}.weight": torch.randint(-1, 2, s, generator=gen, dtype=torch.int8) for m, s in MODULES.items()}
    update = {**signs, **head}
    artifacts.write_artifact(
        folder / "u.safetensors",
        update,
        artifact_meta(
            "update",
            **_base_meta(),
            data={"source": "toy", "template": None, "shard": None},
            samples=8,
            tokens=80,
            seed=0,
            eta=1e-5,
            dtype="float32",
        ),
    )
    factors = dict(head)
    for m, (rows, cols) in MODULES.items():
        factors |= {
            f"{m}.lora_B": torch.randn(rows, RANK, generator=gen),
            f"{m}.lora_R": torch.randn(RANK, RANK, generator=gen),
            f"{m}.lora_A": torch.randn(RANK, cols, generator=gen),
        }
    artifacts.write_artifact(
        folder / "f.safetensors",
        factors,
        artifact_meta(
            "factors",
            **_base_meta(),
            init="lorasb",
            rank=RANK,
            scale=1.0,
            eta=1e-5,
            data=None,
            samples=8,
            seed=0,
            energy={m: 0.5 for m in MODULES},
        ),
    )
    trained = {n: (t + 1 if n.endswith("lora_R") else t) for n, t in factors.items()}
    run_dir = adapter.save_adapter(
        folder / "run", trained, artifact_meta("adapter", **_base_meta(), rank=RANK, scale=1.0)
    )
    files = {
        "update": (folder / "u.safetensors", update),
        "factors": (folder / "f.safetensors", factors),
        "adapter": (run_dir / adapter.ADAPTER_FILE, trained),
    }
    return {kind: {"path": p, "bytes": p.read_bytes(), "tensors": tensors} for kind, (p, tensors) in files.items()}


def _artifact_loader(kind):
    def load(path):
        artifact = artifacts.Artifact(path, kinds=(kind,))
        if kind != "update":
            artifacts.factor_modules(artifact)
        return dict(artifact.items())

    return load


def _load_factors(path):
    factors = artifacts.load_factors(str(path)).factors
    return {f"{m}.{s}": t for m, abc in factors.items() for s, t in zip(artifacts.FACTOR_SUFFIXES, abc)}


def _load_adapter(path):
    lora = adapter.load_adapter(path.parent if path.name == adapter.ADAPTER_FILE else path)
    read = {f"{m}.{s}": t for m, abc in lora.factors.items() for s, t in zip(artifacts.FACTOR_SUFFIXES, abc)}
    return read | lora.extra


def _inspect(path):
    inspect.describe(path)
    inspect.verify(path)
    return {}


LOADERS = {
    "update": [_artifact_loader("update"), _inspect],
    "factors": [_artifact_loader("factors"), _load_factors, _load_adapter, _inspect],
    "adapter": [_artifact_loader("adapter"), _load_adapter, _inspect],
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("fuzz"))


def _feed(kind: str, original: dict, data: bytes) -> str:
    """Write `data` in place of the artifact, run every loader of `kind`; 'rejected' or 'accepted'."""
    path = original["path"]
    path.write_bytes(data)
    outcomes = set()
    for load in LOADERS[kind]:
        try:
            read = load(path)
        except LorasbError as e:
            line = str(e)
            assert line and "\n" not in line, repr(line)
            assert isinstance(e, BadInputError), f"{type(e).__name__}: {line}"  # exit 2: the input's fault
            outcomes.add("rejected")
            continue
        for name, tensor in read.items():
            want = original["tensors"][name]
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), f"accepted a changed '{name}'"
        outcomes.add("accepted")
    # Every loader reads through the one schema: they agree (inspect reads no factors, so it may accept more).
    return "rejected" if "rejected" in outcomes else "accepted"


def _header_length(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def _flip(data: bytes, flips: list[tuple[float, int]], start: int, end: int) -> bytes:
    """`data` with bytes in [start, end) XORed; positions as fractions, so shrinking moves them, not the masks."""
    out = bytearray(data)
    for where, mask in flips:
        out[start + int(where * (end - start - 1))] ^= mask
    assume(out != data)  # two flips of one byte by one mask cancel: no corruption to test
    return bytes(out)


def _with_metadata(data: bytes, text: str) -> bytes:
    header = json.loads(data[8 : _header_length(data)])
    header["__metadata__"]["lorasb"] = text
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[_header_length(data) :]


flips = st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=4)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
KIND_NAMES = list(LOADERS)
TALLY: Counter = Counter()  # (kind, corruption, outcome): the counts reported in the closing note


def _tally(kind: str, corruption: str, outcomes: Counter) -> None:
    for outcome, count in outcomes.items():
        TALLY[kind, corruption, outcome] += count


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_truncated_files_are_always_rejected(originals, kind):
    original, outcomes = originals[kind], Counter()

    @FUZZ
    @given(cut=st.floats(0, 1, exclude_max=True))
    def check(cut):
        outcomes[_feed(kind, original, original["bytes"][: int(cut * len(original["bytes"]))])] += 1

    check()
    _tally(kind, "truncated", outcomes)
    assert outcomes.keys() == {"rejected"}


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_flipped_tensor_bytes_are_always_rejected(originals, kind):
    original, outcomes = originals[kind], Counter()
    data = original["bytes"]

    @FUZZ
    @given(flips=flips)
    def check(flips):
        outcomes[_feed(kind, original, _flip(data, flips, _header_length(data), len(data)))] += 1

    check()
    _tally(kind, "data bytes flipped", outcomes)
    assert outcomes.keys() == {"rejected"}  # every data byte belongs to a hashed tensor


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_flipped_header_bytes_are_rejected_or_harmless(originals, kind):
    original, outcomes = originals[kind], Counter()
    data = original["bytes"]

    @settings(FUZZ, max_examples=80)
    @given(flips=flips)
    def check(flips):
        outcomes[_feed(kind, original, _flip(data, flips, 0, _header_length(data)))] += 1

    check()
    _tally(kind, "header bytes flipped", outcomes)
    assert outcomes["rejected"] > 0


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_a_dtype_changed_at_the_same_byte_size_is_always_rejected(originals, kind):
    original, outcomes = originals[kind], Counter()
    data = original["bytes"]
    header = json.loads(data[8 : _header_length(data)])
    same_size = {"F32": ["I32", "U32"], "I8": ["U8", "BOOL"]}

    @FUZZ
    @given(name=st.sampled_from(sorted(original["tensors"])), pick=st.integers(0, 1))
    def check(name, pick):
        changed = json.loads(json.dumps(header))
        changed[name]["dtype"] = same_size[changed[name]["dtype"]][pick]
        encoded = json.dumps(changed).encode()
        outcomes[_feed(kind, original, struct.pack("<Q", len(encoded)) + encoded + data[_header_length(data) :])] += 1

    check()
    _tally(kind, "dtype changed, same size", outcomes)
    assert outcomes.keys() == {"rejected"}


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_rewritten_metadata_is_rejected_or_reads_the_original_tensors(originals, kind):
    original, outcomes = originals[kind], Counter()
    data = original["bytes"]
    meta = json.loads(json.loads(data[8 : _header_length(data)])["__metadata__"]["lorasb"])
    keys = [*meta, "base_model.id", "base_model.fingerprint", "data.shard", "data.template", "extra"]
    unhashed = {"tensor_sha256", "metadata_sha256"}

    @settings(FUZZ, max_examples=80)
    @given(
        action=st.sampled_from(["set", "delete", "replace", "text"]),
        key=st.sampled_from(keys),
        value=json_values,
        strip=st.booleans(),
        text=st.text(max_size=40),
    )
    def check(action, key, value, strip, text):
        changed = json.loads(json.dumps(meta))
        if strip:  # as an artifact written before hashes were recorded: only the schema stands guard
            changed = {k: v for k, v in changed.items() if k not in unhashed}
        outer, _, inner = key.partition(".")
        where = changed.get(outer) if inner else changed
        field = inner or outer
        if action == "set" and isinstance(where, dict):
            where[field] = value
        elif action == "delete" and isinstance(where, dict):
            where.pop(field, None)
        rewritten = json.dumps(value) if action == "replace" else text if action == "text" else json.dumps(changed)
        outcome = _feed(kind, original, _with_metadata(data, rewritten))
        if outcome == "accepted" and not strip:
            assert json.loads(rewritten) == meta, "accepted edited metadata despite its recorded hash"
        outcomes[outcome] += 1

    check()
    _tally(kind, "metadata rewritten", outcomes)
    assert outcomes["rejected"] > 0
