"""files.check_output_dir (merge's and train's output-folder check) and shards.write_index (the index
ShardWriter and merge's base-layout path both write)."""

from __future__ import annotations

import json

import pytest

from lorasb_cli import files, shards
from lorasb_cli.errors import BadInputError

HINT = "pick a new -o or pass --overwrite"


def test_missing_or_empty_folder_passes(tmp_path):
    assert files.check_output_dir(tmp_path / "new", {}, allow_nonempty=False, hint=HINT) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert files.check_output_dir(tmp_path / "empty", {}, allow_nonempty=False, hint=HINT) == tmp_path / "empty"


def test_nonempty_folder_is_refused_with_the_callers_hint(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(BadInputError, match="output directory exists and is not empty") as caught:
        files.check_output_dir(tmp_path / "out", {}, allow_nonempty=False, hint=HINT)
    assert caught.value.hint == HINT and caught.value.path == str(tmp_path / "out")
    assert files.check_output_dir(tmp_path / "out", {}, allow_nonempty=True, hint=HINT) == tmp_path / "out"


def test_an_input_inside_the_output_is_named_before_the_folder_is_called_non_empty(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter.safetensors").write_bytes(b"x")
    for allow_nonempty in (False, True):  # --overwrite would not help here: the hint must not suggest it
        with pytest.raises(BadInputError, match="would overwrite or write into the adapter"):
            files.check_output_dir(
                tmp_path / "run", {"adapter": tmp_path / "run"}, allow_nonempty=allow_nonempty, hint=HINT
            )


def test_a_file_is_no_output_folder(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(BadInputError, match="output path is a file"):
        files.check_output_dir(tmp_path / "out", {}, allow_nonempty=True, hint=HINT)


def test_write_index_as_shard_writer_writes_it(tmp_path):
    path = shards.write_index(tmp_path, {"a": "model-1.safetensors"}, total_size=8, hashes={"a": "0" * 32})
    assert path == tmp_path / shards.INDEX_FILE and [p.name for p in tmp_path.iterdir()] == [shards.INDEX_FILE]
    expected = {
        "metadata": {"total_size": 8, shards.INDEX_HASH_KEY: {"a": "0" * 32}},
        "weight_map": {"a": "model-1.safetensors"},
    }
    assert path.read_text() == json.dumps(expected, indent=2, sort_keys=True) + "\n"


def test_write_index_keeps_the_base_fields_and_replaces_its_sizes_and_hashes(tmp_path):
    base = {
        "metadata": {"total_size": 1, "total_parameters": 7, shards.INDEX_HASH_KEY: {"old": "f" * 32}},
        "weight_map": {"old": "model-1.safetensors"},
        "other": [1, 2],
    }
    shards.write_index(tmp_path, {"new": "x.safetensors"}, total_size=4, hashes={"new": "1" * 32}, base=base)
    written = json.loads((tmp_path / shards.INDEX_FILE).read_text())
    assert written == {
        "metadata": {"total_size": 4, "total_parameters": 7, shards.INDEX_HASH_KEY: {"new": "1" * 32}},
        "weight_map": {"new": "x.safetensors"},
        "other": [1, 2],
    }
    assert base["metadata"]["total_size"] == 1  # the caller's dict is not changed
