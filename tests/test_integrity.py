"""Integrity and the metadata schema: tensor hashes checked on every read, `inspect --verify`, and one exact
one-line error for each kind of bad metadata (issue 15, items 2 and 3)."""

from __future__ import annotations

import json
import math
import re
import struct

import pytest
import torch
from helpers import CLASS_ROWS, artifact_meta, make_bert_dir, write_jsonl
from safetensors.torch import load_file, save_file

from lorasb_cli import adapter, artifacts, cli, metadata, shards
from lorasb_cli.errors import BadInputError, IncompatibleArtifactError

UPDATE_HINT = "the file is corrupt or was edited; re-create it with lorasb estimate (or lorasb combine)"
FACTORS_HINT = "the file is corrupt or was edited; re-create it with lorasb decompose"
ANY_HINT = "the file is corrupt or was edited; re-create it with the lorasb stage that wrote it"


def run(args, capsys) -> tuple[int, str, str]:
    """`lorasb ARGS` in-process through the real entry point (error handler included)."""
    with pytest.raises(SystemExit) as excinfo:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return excinfo.value.code, out, err


def _update(path, eta=1e-5):
    tensors = {
        "layer.q.weight": torch.tensor([[1, -1, 0], [1, 1, -1]], dtype=torch.int8),
        "classifier.weight": torch.randn(3, 3),
        "classifier.bias": torch.zeros(3),
    }
    # Built as a stage builds it: checked when written, not when made.
    meta = metadata.UpdateMeta(
        base_model=metadata.BaseIdentity(id="toy", fingerprint="0" * 16),
        targets="all-linear",
        method="lorasb",
        data=metadata.DataProvenance(source="toy"),
        samples=4,
        tokens=40,
        seed=0,
        eta=eta,
        dtype="float32",
        labels=("a", "b", "c"),
        head=("classifier.bias", "classifier.weight"),
        architecture="ToyForClassification",
    )
    artifacts.write_artifact(path, tensors, meta)
    return path, tensors


def _factors(path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "m.lora_B": torch.randn(6, 2, generator=gen),
        "m.lora_R": torch.randn(2, 2, generator=gen),
        "m.lora_A": torch.randn(2, 5, generator=gen),
    }
    meta = artifact_meta(
        "factors",
        base_model={"id": "toy", "fingerprint": "0" * 16},
        targets="all-linear",
        method="lorasb",
        init="lorasb",
        rank=2,
        scale=1.0,
        eta=1e-5,
    )
    artifacts.write_artifact(path, tensors, meta)
    return path, tensors


def _header(path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the offset of its first data byte."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), 8 + length


def _write_header(path, header: dict) -> None:
    """Replace the header, keeping the tensor bytes (offsets count from the end of the header)."""
    _, start = _header(path)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + path.read_bytes()[start:])


def _data_offset(path, name: str) -> int:
    """The file offset of tensor `name`'s first byte."""
    header, start = _header(path)
    return start + header[name]["data_offsets"][0]


def _rewrite_meta(path, text: str) -> None:
    """Replace the `lorasb` metadata string, keeping the tensors."""
    save_file(load_file(path), str(path), metadata={"format": "pt", "lorasb": text})


def _flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


# --- hashes recorded and checked ------------------------------------------------------------------------------


def test_every_tensor_and_the_metadata_get_a_hash(tmp_path):
    path, tensors = _update(tmp_path / "u.safetensors")
    art = artifacts.Artifact(path, kinds=("update",))
    assert art.hashes == {name: shards.tensor_hash(t) for name, t in tensors.items()}
    assert shards.is_hash(art.fields["metadata_sha256"])
    # The hash covers dtype and shape, not the bytes alone: the same bytes as another dtype or shape differ.
    ones = torch.ones(4, 8)
    assert (
        len(
            {
                shards.tensor_hash(ones),
                shards.tensor_hash(ones.view(torch.int32)),
                shards.tensor_hash(ones.reshape(8, 4)),
            }
        )
        == 3
    )
    assert art.verify() == 3
    assert all(torch.equal(t, tensors[n]) for n, t in art.items())


def test_a_flipped_data_byte_is_named_by_file_and_tensor_on_every_read_path(tmp_path):
    path, _ = _update(tmp_path / "u.safetensors")
    _flip(path, _data_offset(path, "layer.q.weight"))  # an int8 sign 1 → 17: finite, silently wrong without hashes
    art = artifacts.Artifact(path, kinds=("update",))
    expected = (
        f"tensor 'layer.q.weight' does not match the hash recorded when it was written (sha256 "
        f"{art.hashes['layer.q.weight']}): the file is corrupt or was modified ({path}) — copy it again, or "
        "re-create it with lorasb estimate (or lorasb combine)"
    )
    with pytest.raises(IncompatibleArtifactError) as excinfo:
        art.get("layer.q.weight", torch.float32)
    assert str(excinfo.value) == expected
    with pytest.raises(IncompatibleArtifactError, match="'layer.q.weight' does not match"):
        dict(art.items())
    assert torch.equal(art.get("classifier.bias"), torch.zeros(3))  # the other tensors still read


def test_flipped_factors_are_refused_by_train_and_adapter_loaders(tmp_path):
    path, _ = _factors(tmp_path / "f.safetensors")
    _flip(path, _data_offset(path, "m.lora_R") + 1)
    for load in (artifacts.load_factors, adapter.load_adapter):
        with pytest.raises(IncompatibleArtifactError, match=f"'m.lora_R' does not match.*{re.escape(str(path))}"):
            load(str(path))


@pytest.mark.parametrize("edit", [{"dtype": "I32"}, {"shape": [3, 4]}])
def test_a_header_edit_that_keeps_the_byte_size_is_refused(tmp_path, edit):
    # lora_B is F32 [6, 2]: its 48 bytes read as I32, or as [3, 4], are other numbers.
    path, _ = _factors(tmp_path / "f.safetensors")
    header, _ = _header(path)
    header["m.lora_B"] |= edit
    _write_header(path, header)
    art = artifacts.Artifact(path)
    with pytest.raises(IncompatibleArtifactError, match="tensor 'm.lora_B' does not match the hash"):
        art.get("m.lora_B")


def test_an_edited_metadata_value_is_refused(tmp_path):
    path, _ = _update(tmp_path / "u.safetensors")
    meta = artifacts.Artifact(path).fields
    _rewrite_meta(path, json.dumps({**meta, "eta": 2e-5}))  # valid, but not what was written: ΔW would double
    with pytest.raises(IncompatibleArtifactError) as excinfo:
        artifacts.Artifact(path)
    expected = f"lorasb metadata does not match the hash recorded when it was written ({path}) — {UPDATE_HINT}"
    assert str(excinfo.value) == expected


def test_artifacts_without_hashes_are_refused_unless_allowed(tmp_path, capsys):
    """Written before lorasb recorded hashes, or stripped of them: nothing stands guard over the tensors."""
    path, tensors = _update(tmp_path / "u.safetensors")
    _rewrite_meta(path, json.dumps(_unhashed(artifacts.Artifact(path).fields)))
    with pytest.raises(IncompatibleArtifactError, match="records no hashes of its tensors.*--allow-unverified"):
        artifacts.Artifact(path, kinds=("update",))
    with artifacts.unverified_allowed():
        art = artifacts.Artifact(path, kinds=("update",))
    assert art.hashes is None and art.verify() == 0
    assert torch.equal(art.get("layer.q.weight"), tensors["layer.q.weight"])
    status, out, err = run(["inspect", "--verify", path], capsys)
    assert status == 2 and out == "" and "no hashes recorded: its 3 tensors cannot be verified" in err
    assert run(["inspect", path], capsys)[0] == 0  # inspect still shows what it is


def test_copied_hashes_never_describe_new_tensors(tmp_path):
    path, _ = _factors(tmp_path / "f.safetensors")
    meta = artifacts.Artifact(path).meta  # a stage that passes on what it read, hashes included
    doubled = {n: 2 * t for n, t in load_file(path).items()}
    artifacts.write_artifact(tmp_path / "g.safetensors", doubled, meta)
    assert artifacts.Artifact(tmp_path / "g.safetensors").verify() == 3
    # Nor in adapter_config.json, which save_adapter writes from the same fields.
    assert not {"tensor_sha256", "metadata_sha256"} & artifacts.recorded_fields(meta).keys()


def test_a_rank_above_min_m_n_is_refused(tmp_path):
    tensors = {"m.lora_B": torch.ones(2, 3), "m.lora_R": torch.eye(3), "m.lora_A": torch.ones(3, 4)}
    meta = artifact_meta("factors", base_model={"id": "toy", "fingerprint": "0" * 16}, rank=3)
    artifacts.write_artifact(tmp_path / "f.safetensors", tensors, meta)
    with pytest.raises(IncompatibleArtifactError) as excinfo:
        artifacts.load_factors(str(tmp_path / "f.safetensors"))
    assert str(excinfo.value) == (
        f"module 'm' has rank 3, more than min(m, n) = 2 of its 2×4 weight ({tmp_path / 'f.safetensors'}) — re-run "
        "lorasb decompose with --rank 2 or less"
    )


# --- inspect --verify -------------------------------------------------------------------------------------------


def test_inspect_verify_a_file_and_an_adapter_directory(tmp_path, capsys):
    path, tensors = _factors(tmp_path / "f.safetensors")
    assert run(["inspect", "--verify", path], capsys) == (
        0,
        f"verified: all 3 tensors match their recorded hashes ({path})\n",
        "",
    )
    config = {
        "base_model": {"id": "toy", "fingerprint": "0" * 16},
        "targets": "all-linear",
        "rank": 2,
        "scale": 1.0,
        "method": "lorasb",
    }
    run_dir = adapter.save_adapter(tmp_path / "run", tensors, artifact_meta("adapter", **config))
    status, out, _ = run(["inspect", "--verify", run_dir, "--json"], capsys)
    assert status == 0
    assert json.loads(out) == {
        "path": str(run_dir / "adapter.safetensors"),
        "kind": "adapter",
        "tensors": 3,
        "verified": 3,
        "status": "ok",
    }
    _flip(run_dir / "adapter.safetensors", _data_offset(run_dir / "adapter.safetensors", "m.lora_A"))
    status, out, err = run(["inspect", "--verify", run_dir], capsys)
    assert (status, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("Error: tensor 'm.lora_A' does not match the hash recorded")
    assert f"({run_dir / 'adapter.safetensors'})" in err


def _merged_dir(tmp_path, shard_bytes):
    out = tmp_path / f"merged-{shard_bytes}"
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layer.{i}.weight": torch.randn(4, 4, generator=gen).to(torch.bfloat16) for i in range(3)}
    with shards.ShardWriter(out, shard_bytes, metadata={"lorasb": "{}"}) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        writer.finalize()
    (out / "config.json").write_text("{}")
    return out, tensors


def test_merged_checkpoint_shards_and_index_record_the_hashes(tmp_path, capsys):
    out, tensors = _merged_dir(tmp_path, 40)  # 32-byte tensors: one per shard, and an index
    index_meta = json.loads((out / shards.INDEX_FILE).read_text())["metadata"]
    assert index_meta[shards.INDEX_HASH_KEY] == {n: shards.tensor_hash(t) for n, t in tensors.items()}
    assert run(["inspect", "--verify", out], capsys) == (
        0,
        f"verified: all 3 tensors match their recorded hashes ({out})\n",
        "",
    )
    index = shards.CheckpointIndex(out)
    shard = index.info("layer.1.weight").shard
    _flip(out / shard, _data_offset(out / shard, "layer.1.weight"))
    assert torch.equal(index.get("layer.0.weight"), tensors["layer.0.weight"])
    with pytest.raises(IncompatibleArtifactError, match=f"'layer.1.weight' does not match.*{shard}"):
        index.get("layer.1.weight")  # what merge reads a base with
    status, _, err = run(["inspect", "--verify", out], capsys)
    assert status == 2 and "tensor 'layer.1.weight' does not match" in err and err.count("\n") == 1


def test_one_shard_checkpoint_records_the_hashes_in_its_header(tmp_path, capsys):
    out, _ = _merged_dir(tmp_path, 10**6)
    assert not (out / shards.INDEX_FILE).exists()
    assert shards.CheckpointIndex(out).verify() == 3
    _flip(out / shards.SINGLE_FILE, _data_offset(out / shards.SINGLE_FILE, "layer.2.weight"))
    with pytest.raises(IncompatibleArtifactError, match="'layer.2.weight' does not match"):
        shards.CheckpointIndex(out).verify()


def test_index_that_disagrees_with_its_shards_is_refused(tmp_path):
    out, _ = _merged_dir(tmp_path, 40)
    index = json.loads((out / shards.INDEX_FILE).read_text())
    index["metadata"][shards.INDEX_HASH_KEY]["layer.0.weight"] = "0" * 32
    (out / shards.INDEX_FILE).write_text(json.dumps(index))
    first = out / "model-00001-of-00003.safetensors"
    with pytest.raises(IncompatibleArtifactError) as excinfo:
        shards.CheckpointIndex(out)
    assert str(excinfo.value) == (
        f"the index records a hash for 'layer.0.weight' that {first.name} contradicts ({out / shards.INDEX_FILE}) "
        "— the checkpoint is mixed up; copy it again or re-run the merge"
    )
    # A shard without hashes under an index with them: e.g. the index of a hashed checkpoint copied over.
    header, _ = _header(first)
    del header["__metadata__"][shards.SHARD_HASH_KEY]
    _write_header(first, header)
    with pytest.raises(IncompatibleArtifactError, match=f"'layer.0.weight' that {first.name} does not record"):
        shards.CheckpointIndex(out)


def test_inspect_verify_a_peft_export(tmp_path, capsys):
    out = tmp_path / "peft"
    out.mkdir()
    prefix = "base_model.model.m"
    tensors = {f"{prefix}.lora_A.weight": torch.ones(2, 5), f"{prefix}.lora_B.weight": torch.ones(6, 2)}
    save_file(
        tensors,
        str(out / "adapter_model.safetensors"),
        metadata=shards.hashed_metadata({"format": "pt"}, shards.tensor_hashes(tensors)),
    )
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    assert run(["inspect", "--verify", out], capsys) == (
        0,
        f"verified: all 2 tensors match their recorded hashes ({out})\n",
        "",
    )
    _flip(out / "adapter_model.safetensors", _data_offset(out / "adapter_model.safetensors", next(iter(tensors))))
    status, _, err = run(["inspect", "--verify", out], capsys)
    assert status == 2 and "tensor 'base_model.model.m.lora_A.weight' does not match" in err


def test_a_model_saved_by_transformers_has_no_hashes(tiny_model_dir, capsys):
    status, out, err = run(["inspect", "--verify", tiny_model_dir], capsys)
    assert status == 2 and out == "" and "no hashes recorded" in err


# --- inspect on a classifier's update -------------------------------------------------------------------------


def test_inspect_describes_and_verifies_a_classification_update(tmp_path, capsys):
    """A real BERT classifier update carries its head (a 1-D bias among it): inspect failed with IndexError."""
    from lorasb_cli import estimate

    model_dir = make_bert_dir(tmp_path / "bert")
    data = write_jsonl(tmp_path / "train.jsonl", CLASS_ROWS)
    update = tmp_path / "u.safetensors"
    estimate.estimate(
        estimate.EstimateConfig(
            model=str(model_dir),
            data=str(data),
            out=str(update),
            samples=6,
            format="classification",
            batch_size=6,
            max_length=32,
        )
    )
    capsys.readouterr()  # transformers' progress bars while saving and loading the model
    status, out, err = run(["inspect", update, "--json"], capsys)
    assert (status, err) == (0, "")
    described = json.loads(out)
    # 6 linear layers in each of 2 blocks, and the pooler; the head is counted apart, not as modules.
    assert described["modules"] == 13 and not any(m.startswith("classifier") for m in described["shapes"])
    assert described["parameters"]["head"] == 3 * 32 + 3
    assert run(["inspect", update], capsys)[0] == 0
    assert run(["inspect", "--verify", update], capsys) == (
        0,
        f"verified: all 15 tensors match their recorded hashes ({update})\n",
        "",
    )


# --- the schema: one exact line for each kind of bad metadata -------------------------------------------------


def _unhashed(meta):
    return {k: v for k, v in meta.items() if k not in ("tensor_sha256", "metadata_sha256")}


def _set(**fields):
    return lambda meta: {**meta, **fields}


def _drop(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _nested(depth):
    """The metadata with `data` an array nested `depth` deep (as text: json itself would recurse too deep)."""
    return lambda meta: json.dumps({**meta, "data": None}).replace('"data": null', "[" * depth + "]" * depth)


def _hashes(change):
    return lambda meta: {**meta, "tensor_sha256": change(meta["tensor_sha256"])}


U, F = "update", "factors"
FIELD = "metadata field"
# id: (kind, change to the valid metadata (or its whole new text), message before " (path) — hint", hint)
# fmt: off
SCHEMA_CASES = {
    "missing eta": (U, _drop("eta"), f"{FIELD} 'eta' is missing; it must be a finite number > 0", UPDATE_HINT),
    "missing base_model": (U, _drop("base_model"), f"{FIELD} 'base_model' is missing; it must be an object",
                           UPDATE_HINT),
    "missing rank": (F, _drop("rank"), f"{FIELD} 'rank' is missing; it must be an integer ≥ 1", FACTORS_HINT),
    "missing targets": (U, _drop("targets"), f"{FIELD} 'targets' is missing; it must be a string or a list of strings",
                        UPDATE_HINT),
    "a JSON list": (U, "[1, 2]", "lorasb metadata is a JSON array, not an object", ANY_HINT),
    "a JSON number": (U, "3.5", "lorasb metadata is a JSON number, not an object", ANY_HINT),
    "a JSON string": (U, '"update"', "lorasb metadata is a JSON string, not an object", ANY_HINT),
    "not JSON": (U, "{'kind': 'update'}", ("lorasb metadata is not valid JSON (Expecting property name enclosed in "
                                           "double quotes: line 1 column 2 (char 1))"), ANY_HINT),
    "string format_version": (U, _set(format_version="1"),
                              f"{FIELD} 'format_version' is the string \"1\"; it must be an integer ≥ 1", ANY_HINT),
    "newer format_version": (U, _set(format_version=2), "artifact format version 2 is newer than this lorasb reads (1)",
                             "upgrade lorasb"),
    "unknown kind": (U, _set(kind="gradients"),
                     (f"{FIELD} 'kind' is the string \"gradients\"; it must be one of update, update-raw, factors, "
                      "adapter"),
                     ANY_HINT),
    "head naming a missing tensor": (U, _set(head=["classifier.bias", "score.weight"]),
                                     f"{FIELD} 'head' names tensor 'score.weight', which the file does not hold",
                                     UPDATE_HINT),
    "head not a list": (U, _set(head="classifier.bias"),
                        f"{FIELD} 'head' is the string \"classifier.bias\"; it must be a list of strings", UPDATE_HINT),
    "deeply nested JSON": (U, _nested(100_000), "lorasb metadata nests 100001 levels deep, over the limit of 32",
                           ANY_HINT),
    "nested one past the limit": (U, _nested(32), "lorasb metadata nests 33 levels deep, over the limit of 32",
                                  ANY_HINT),
    "10 MB metadata": (U, _set(notes="x" * 10_000_000), None, ANY_HINT),  # message computed in the test
    "eta inf": (U, _set(eta=math.inf), f"{FIELD} 'eta' is inf; it must be a finite number > 0", UPDATE_HINT),
    "eta NaN": (U, _set(eta=math.nan), f"{FIELD} 'eta' is nan; it must be a finite number > 0", UPDATE_HINT),
    "eta 0": (U, _set(eta=0), f"{FIELD} 'eta' is 0; it must be a finite number > 0", UPDATE_HINT),
    "eta -1": (U, _set(eta=-1), f"{FIELD} 'eta' is -1; it must be a finite number > 0", UPDATE_HINT),
    "eta a string": (U, _set(eta="1e-5"), f"{FIELD} 'eta' is the string \"1e-5\"; it must be a finite number > 0",
                     UPDATE_HINT),
    "eta true": (U, _set(eta=True), f"{FIELD} 'eta' is a JSON boolean; it must be a finite number > 0", UPDATE_HINT),
    "rank 0": (F, _set(rank=0), f"{FIELD} 'rank' is 0; it must be an integer ≥ 1", FACTORS_HINT),
    "rank 2.0": (F, _set(rank=2.0), f"{FIELD} 'rank' is 2.0; it must be an integer ≥ 1", FACTORS_HINT),
    "rank unlike the tensors": (F, lambda m: {**_unhashed(m), "rank": 3}, None, None),  # found by factor_modules
    "scale inf": (F, _set(scale=math.inf), f"{FIELD} 'scale' is inf; it must be a finite number", FACTORS_HINT),
    "fingerprint a number": (F, _set(base_model={"id": "toy", "fingerprint": 7}),
                             f"{FIELD} 'base_model.fingerprint' is 7; it must be a string", FACTORS_HINT),
    "labels not strings": (U, _set(labels=[0, 1, 2]), f"{FIELD} 'labels' is a JSON array; it must be a list of strings",
                           UPDATE_HINT),
    "labels without architecture": (U, _drop("architecture"), (f"{FIELD} 'architecture' is missing beside 'labels'; "
                                    "it must be the classifier's class name"), UPDATE_HINT),
    "shard out of range": (U, _set(data={"shard": [2, 2]}),
                           f"{FIELD} 'data.shard' is a JSON array; it must be [i, n] with 0 ≤ i < n", UPDATE_HINT),
    "hash of a missing tensor": (F, _hashes(lambda h: {**h, "x": "0" * 32}),
                                 f"{FIELD} 'tensor_sha256' names tensor 'x', which the file does not hold",
                                 FACTORS_HINT),
    "no hash of a tensor": (F, _hashes(lambda h: {"m.lora_A": h["m.lora_A"]}),
                            f"{FIELD} 'tensor_sha256' records no hash of tensor 'm.lora_B', which the file holds",
                            FACTORS_HINT),
    "tensor hashes without the metadata hash": (F, _drop("metadata_sha256"),
                                                f"{FIELD} 'metadata_sha256' is missing; it must be a sha256 prefix",
                                                FACTORS_HINT),
}
# fmt: on


@pytest.mark.parametrize("case", SCHEMA_CASES)
def test_bad_metadata_is_one_exact_line_and_exit_2(tmp_path, capsys, case):
    kind, change, message, hint = SCHEMA_CASES[case]
    path, _ = (_update if kind == "update" else _factors)(tmp_path / "a.safetensors")
    text = change if isinstance(change, str) else change(artifacts.Artifact(path).fields)
    text = text if isinstance(text, str) else json.dumps(text)
    _rewrite_meta(path, text)
    if case == "10 MB metadata":
        message = f"lorasb metadata is {len(text.encode()):,} bytes, over the limit of {1_000_000 + 256 * 3:,}"
    if case == "rank unlike the tensors":
        message = "module 'm' has rank 2, the metadata field 'rank' says 3"
        hint = "the file is corrupt or was edited; re-run lorasb decompose"
    expected = f"{message} ({path}) — {hint}"

    # An unhashed file is refused as such, unless allowed (as inspect does): then its schema stands guard alone.
    unhashed = artifacts.unverified_allowed(case == "rank unlike the tensors")
    with pytest.raises(IncompatibleArtifactError) as excinfo, unhashed:
        art = artifacts.Artifact(path, kinds=(kind,))
        artifacts.factor_modules(art)
    assert str(excinfo.value) == expected
    status, out, err = run(["inspect", path], capsys)
    assert (status, out, err) == (2, "", f"Error: {expected}\n")


def test_a_stage_cannot_write_what_the_reader_refuses(tmp_path):
    with pytest.raises(BadInputError) as excinfo:
        _update(tmp_path / "u.safetensors", eta=math.inf)
    assert str(excinfo.value) == (
        "refusing to write an artifact whose metadata field 'eta' is inf; it must be a finite number > 0 "
        f"({tmp_path / 'u.safetensors'}) — check the option that sets it (e.g. --eta must be a finite number > 0)"
    )
    assert list(tmp_path.iterdir()) == []
