"""The typed artifact metadata (lorasb_cli/metadata.py): files of the previous release read unchanged, checks
generated from the field declarations, and no stage indexing metadata by string."""

from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from pathlib import Path

import pytest
import torch

from lorasb_cli import adapter, artifacts, metadata
from lorasb_cli.errors import IncompatibleArtifactError

PREVIOUS = Path(__file__).parent / "fixtures" / "previous-release"
ROOT = Path(__file__).parent.parent


def _recorded(path: Path) -> dict:
    """The `lorasb` JSON of a safetensors file, read by hand: no lorasb code between the test and the bytes."""
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_length])
    return json.loads(header["__metadata__"]["lorasb"])


def test_an_update_of_the_previous_release_reads_unchanged():
    art = artifacts.Artifact(PREVIOUS / "update.safetensors", kinds=("update",))
    meta = art.meta
    assert isinstance(meta, metadata.UpdateMeta) and art.verify() == 2
    assert meta.base_model == metadata.BaseIdentity(
        id="/tmp/fx/work/tiny", fingerprint="af585f396306d7a1", weights_digest="8daf8db7bfcbc7b9"
    )
    assert (meta.eta, meta.samples, meta.tokens, meta.seed, meta.targets) == (1e-5, 4, 59, 0, "q_proj,v_proj")
    assert (meta.data.template, meta.data.digest, meta.data.drawn, meta.data.shard) == (
        "alpaca",
        "1f49d392a24ebb9e",
        4,
        None,
    )
    # ΔW = η·signs: the magnitude comes from the typed field.
    signs = art.get(art.names[0], torch.float32)
    assert torch.equal(artifacts.load_update(art, art.names[0]), signs * 1e-5)


def test_a_raw_shard_of_the_previous_release_reads_unchanged():
    meta = artifacts.Artifact(PREVIOUS / "update-raw-shard.safetensors", kinds=("update-raw",)).meta
    assert isinstance(meta, metadata.RawShardMeta)
    assert meta.data.shard == [0, 2] and meta.samples == 2 and meta.dtype == "float32"
    assert meta.data.sampling() == artifacts.Artifact(PREVIOUS / "update.safetensors").meta.data.sampling()


def test_factors_of_the_previous_release_read_unchanged():
    loaded = artifacts.load_factors(PREVIOUS / "factors.safetensors")
    meta = loaded.meta
    assert isinstance(meta, metadata.FactorsMeta)
    assert (meta.rank, meta.init, meta.scale, meta.eta, meta.samples) == (2, "lorasb", 1.0, 1e-5, 4)
    assert meta.svd == {"exact": False, "niter": 4, "oversampling": 16}
    assert (
        set(meta.energy)
        == set(loaded.factors)
        == {
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
        }
    )
    classifier = artifacts.load_factors(PREVIOUS / "classifier-factors.safetensors").meta
    assert classifier.labels == ("crude", "earn", "trade")
    assert classifier.architecture == "BertForSequenceClassification"
    assert classifier.head == ("classifier.bias", "classifier.weight")
    assert classifier.data.template is None and classifier.data.format == "classification"


def test_an_adapter_of_the_previous_release_reads_unchanged():
    saved = adapter.load_adapter(PREVIOUS / "adapter")
    meta = saved.meta
    assert isinstance(meta, metadata.AdapterMeta)
    assert (meta.method, meta.rank, meta.init, meta.eta, meta.scale) == ("lorasb", 2, "lorasb", 1e-5, 1.0)
    assert meta.target_modules == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
    assert meta.train["max_steps"] == 2 and meta.data.template == "alpaca"
    assert meta.extra == {"init_scale": 1.0, "init_scale_curve": None}  # the method's own settings, kept
    config = json.loads((PREVIOUS / "adapter" / adapter.CONFIG_FILE).read_text())
    assert metadata.adapter_config(config) == dataclasses.replace(meta, tensor_sha256=None)


def test_a_merged_model_of_the_previous_release_reads_unchanged():
    merged = artifacts.merged_from(PREVIOUS / "merged")
    adapter_meta = adapter.load_adapter(PREVIOUS / "adapter").meta
    # The digest merge recorded then is the one this lorasb computes from the same adapter now.
    assert merged.merged_from.adapter_digest == adapter_meta.content_digest() == "8089492b37557138"
    assert merged.merged_from.base_model == adapter_meta.base_model
    assert (merged.merged_from.rank, merged.merged_from.method) == (2, "lorasb")
    assert merged.prompting().template == "alpaca" and merged.base_model == "/tmp/fx/work/tiny"
    rebuilt = metadata.MergedMeta.from_adapter(adapter_meta, base_id=merged.base_model, version="0.1.0")
    assert rebuilt.to_json() == _recorded(PREVIOUS / "merged" / "model.safetensors")


@pytest.mark.parametrize(
    "name",
    [
        "update.safetensors",
        "update-raw-shard.safetensors",
        "factors.safetensors",
        "classifier-factors.safetensors",
        "adapter/adapter.safetensors",
    ],
)
def test_rewritten_metadata_keeps_every_recorded_value(name, tmp_path):
    """Both ways: what this lorasb writes for metadata it read is what the old file recorded, and reads back as the
    same typed metadata."""
    art = artifacts.Artifact(PREVIOUS / name)
    copy = tmp_path / "copy.safetensors"
    artifacts.write_artifact(copy, {n: art.get(n) for n in art.names}, art.meta)
    again = artifacts.Artifact(copy)
    assert dataclasses.replace(again.meta, versions=None, created=None) == dataclasses.replace(
        art.meta, versions=None, created=None
    )
    old, new = _recorded(PREVIOUS / name), _recorded(copy)
    for changing in ("versions", "created", "metadata_sha256"):  # the time and the libraries of this write
        old.pop(changing), new.pop(changing)
    assert new == old


def _declared(cls) -> list[tuple[str, object]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls) if "meta" in f.metadata]


def _wrong_value(hint) -> object:
    """A JSON value no field of annotation `hint` accepts: an object for a scalar or list, a list for an object."""
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    accepts_object = any(
        (typing.get_origin(h) or h) is dict or isinstance(h, type) and issubclass(h, metadata.Record) for h in members
    )
    return [1.5] if accepts_object else {"x": 1}


@pytest.mark.parametrize("kind", metadata.KIND_CLASSES)
def test_every_declared_field_is_checked(kind):
    """The checks are generated from the declarations: a value of the wrong JSON type in any field is refused with
    one line naming that field, whatever the field."""
    good = artifacts.Artifact(
        PREVIOUS
        / {"update": "update.safetensors", "update-raw": "update-raw-shard.safetensors"}.get(
            kind, "adapter/adapter.safetensors" if kind == "adapter" else "factors.safetensors"
        )
    ).fields
    cls = metadata.KIND_CLASSES[kind]
    fields = {k: v for k, v in good.items() if k not in ("tensor_sha256", "metadata_sha256")}
    for name, hint in _declared(cls):
        if name == "tensor_sha256":
            continue
        with pytest.raises(IncompatibleArtifactError, match=f"metadata field '{name}' is a JSON"):
            cls.from_json({**fields, name: _wrong_value(hint)}, path="x")
    for name, hint in _declared(metadata.DataProvenance):
        with pytest.raises(IncompatibleArtifactError, match=f"metadata field 'data.{name}' is a JSON"):
            cls.from_json({**fields, "data": {**fields["data"], name: _wrong_value(hint)}}, path="x")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if "meta" in f.metadata and f.default is f.default_factory is dataclasses.MISSING
    ]
    assert "base_model" in required
    for name in required:
        without = {k: v for k, v in fields.items() if k != name}
        with pytest.raises(IncompatibleArtifactError, match=f"metadata field '{name}' is missing"):
            cls.from_json(without, path="x")


# --- no string-indexed metadata outside the schema ------------------------------------------------------------

# What counts as indexing artifact metadata by string: reading `X["key"]` or calling `X.get("key", ...)` with a
# string literal key, where either X names metadata (a variable or attribute called meta, fields, provenance or
# config: what stages called the metadata dict) or the key is one only metadata has (a field of the schema that
# no other record in lorasb uses). Writing a JSON object (a dict literal, `config["x"] = ...`) is not reading it.
METADATA_NAMES = {"meta", "fields", "provenance", "config"}
METADATA_KEYS = {
    "base_model",
    "fingerprint",
    "weights_digest",
    "eta",
    "rank_pattern",
    "target_modules",
    "init_adapter",
    "merged_from",
    "adapter_digest",
    "tensor_sha256",
    "metadata_sha256",
    "format_version",
}
# Receivers named like metadata that hold something else: a PEFT adapter's config.
NOT_METADATA = {("inspect.py", "config")}


def string_indexed_metadata(source: str, module: str) -> list[str]:
    """`receiver[key]` / `receiver.get(key)` expressions of `source` that index artifact metadata by a string."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):  # reads, not writes of a JSON object
            receiver, key = node.value, node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            receiver, key = node.func.value, node.args[0] if node.args else None
        else:
            continue
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
            continue
        name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", None)
        named = name in METADATA_NAMES and (module, name) not in NOT_METADATA
        if named or key.value in METADATA_KEYS:
            found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_stage_indexes_metadata_by_string():
    found = [
        hit
        for path in sorted((ROOT / "lorasb_cli").rglob("*.py"))
        if path.name != "metadata.py"
        for hit in string_indexed_metadata(path.read_text(), path.name)
    ]
    assert not found, "read metadata through lorasb_cli/metadata.py's classes:\n" + "\n".join(found)


def test_the_metadata_grep_finds_what_it_must():
    """The grep fails on the forms the stages used before the schema, and passes attribute access."""
    before = """
eta = artifact.meta["eta"]
base = lora.config.get("base_model") or {}
made_on = recorded.get("weights_digest")
template = (factors.config.get("data") or {}).get("template")
"""
    assert len(string_indexed_metadata(before, "x.py")) == 4  # `.get("data")` of a config: by its receiver
    assert string_indexed_metadata("eta = artifact.meta.eta\nrow.get('input')\nspec['range']", "x.py") == []
