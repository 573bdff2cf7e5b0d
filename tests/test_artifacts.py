"""Artifacts: provenance round trip, atomic writes, and one clear error for every unreadable file."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import artifact_meta
from safetensors.torch import save_file

from lorasb_cli import artifacts, files, metadata
from lorasb_cli.errors import BadInputError, IncompatibleArtifactError, NonFiniteError


def _meta(kind="update"):
    rank = {"rank": 2} if kind in ("factors", "adapter") else {}  # the schema requires what the stages read
    return artifact_meta(
        kind, base_model={"id": "toy", "fingerprint": "f" * 16}, targets="all-linear", eta=1e-5, **rank
    )


def test_round_trip_keeps_tensors_and_provenance(tmp_path):
    tensors = {
        "a.weight": torch.tensor([[1, -1], [0, 1]], dtype=torch.int8),
        "b.weight": torch.ones(3, 2, dtype=torch.int8),
    }
    artifacts.write_artifact(tmp_path / "u.safetensors", tensors, _meta())
    art = artifacts.Artifact(tmp_path / "u.safetensors", kinds=("update",))
    assert art.kind == "update" and art.fields["eta"] == 1e-5 and art.fields["base_model"]["id"] == "toy"
    assert sorted(art.names) == ["a.weight", "b.weight"]
    assert torch.equal(art.get("a.weight"), tensors["a.weight"])
    assert art.shapes()["b.weight"] == (3, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["u.safetensors"]  # no temp file left behind


def test_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(NonFiniteError, match="'x'"):
        artifacts.write_artifact(tmp_path / "u.safetensors", {"x": torch.tensor([float("nan")])}, _meta())
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), files.atomic_path(tmp_path / "v.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_output_folder_is_created_and_one_under_a_file_is_bad_input(tmp_path):
    """File outputs create their parent folder, as `train -o run/` creates its folder."""
    written = artifacts.write_artifact(tmp_path / "no" / "deeper" / "u.safetensors", {"x": torch.zeros(1)}, _meta())
    assert written.is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadInputError, match="output folder lies under a regular file") as excinfo:
        artifacts.write_artifact(tmp_path / "file" / "sub" / "u.safetensors", {"x": torch.zeros(1)}, _meta())
    assert excinfo.value.path == str(tmp_path / "file")


def test_a_read_only_output_folder_is_bad_input(tmp_path, monkeypatch):
    """As a non-root user meets it (root writes into a 0555 folder, so the refusal is simulated at the syscall)."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(BadInputError, match=r"cannot write .*u.safetensors \(permission denied\)"):
        artifacts.write_artifact(tmp_path / "u.safetensors", {"x": torch.zeros(1)}, _meta())
    assert list(tmp_path.iterdir()) == []


def _written(tmp_path):
    return artifacts.write_artifact(
        tmp_path / "u.safetensors", {"w.weight": torch.ones(64, 64, dtype=torch.int8)}, _meta()
    )


def test_truncated_file_is_rejected(tmp_path):
    path = _written(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(BadInputError, match="not a readable safetensors file"):
        artifacts.Artifact(path)


def test_other_format_is_rejected(tmp_path):
    path = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2)}, path)  # a pickle: must be refused without being unpickled
    with pytest.raises(BadInputError, match=r"not a lorasb artifact \(safetensors\) but a zip archive"):
        artifacts.Artifact(path)


def test_safetensors_without_lorasb_metadata_is_rejected(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(IncompatibleArtifactError, match="without lorasb metadata"):
        artifacts.Artifact(path)


def test_wrong_kind_names_the_producer(tmp_path):
    path = _written(tmp_path)
    with pytest.raises(IncompatibleArtifactError) as excinfo:
        artifacts.Artifact(path, kinds=("factors",))
    assert "expected a factors artifact, got a update" in excinfo.value.one_line()
    assert "lorasb decompose" in excinfo.value.one_line()


def test_newer_format_version_is_refused(tmp_path):
    meta = artifacts.recorded_fields(_meta())
    meta["format_version"] = metadata.FORMAT_VERSION + 1
    path = tmp_path / "u.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"lorasb": json.dumps(meta)})
    with pytest.raises(IncompatibleArtifactError, match="upgrade lorasb|newer"):
        artifacts.Artifact(path)


def test_nan_in_a_stored_tensor_is_caught_on_read(tmp_path):
    path = tmp_path / "f.safetensors"
    save_file(
        {"m.lora_R": torch.tensor([[float("inf")]])},
        str(path),
        metadata={"lorasb": json.dumps(artifacts.recorded_fields(_meta("factors")))},
    )
    with artifacts.unverified_allowed():  # written without hashes, as an older lorasb did
        art = artifacts.Artifact(path, kinds=("factors",))
    with pytest.raises(NonFiniteError, match="m.lora_R"):
        art.get("m.lora_R")


def test_factor_modules_checks_shapes(tmp_path):
    good = {"m.lora_B": torch.zeros(6, 2), "m.lora_R": torch.zeros(2, 2), "m.lora_A": torch.zeros(2, 5)}
    artifacts.write_artifact(tmp_path / "f.safetensors", good, _meta("factors"))
    assert artifacts.factor_modules(artifacts.Artifact(tmp_path / "f.safetensors")) == ["m"]
    bad = {**good, "m.lora_A": torch.zeros(3, 5)}
    artifacts.write_artifact(tmp_path / "g.safetensors", bad, _meta("factors"))
    with pytest.raises(IncompatibleArtifactError, match="inconsistent shapes"):
        artifacts.factor_modules(artifacts.Artifact(tmp_path / "g.safetensors"))
    del bad["m.lora_R"]
    artifacts.write_artifact(tmp_path / "h.safetensors", bad, _meta("factors"))
    with pytest.raises(IncompatibleArtifactError, match="lacks lora_R"):
        artifacts.factor_modules(artifacts.Artifact(tmp_path / "h.safetensors"))
    assert os.path.exists(tmp_path / "h.safetensors")


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with files.atomic_path(tmp_path / "f.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(mask)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
