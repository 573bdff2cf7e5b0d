"""Tests of lorasb_cli.shards: lazy checkpoint index/reader, capped shard writer, size parsing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it at import

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorasb_cli import shards
from lorasb_cli.errors import BadInputError
from lorasb_cli.shards import INDEX_FILE, SINGLE_FILE, CheckpointIndex, ShardWriter, parse_size


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def sharded_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(path, max_shard_size="20KB")
    return path


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


class SafeOpenSpy:
    """Stands in for `safe_open`: counts the shards opened and the most handles open at once."""

    def __init__(self, safe_open):
        self.safe_open = safe_open
        self.opened: list[str] = []
        self.open_now = 0
        self.max_open = 0

    @contextlib.contextmanager
    def __call__(self, path, framework):
        with self.safe_open(path, framework=framework) as handle:
            self.opened.append(os.path.basename(path))
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
            try:
                yield handle
            finally:
                self.open_now -= 1


@pytest.fixture
def spy(monkeypatch) -> SafeOpenSpy:
    spy = SafeOpenSpy(shards.safe_open)
    monkeypatch.setattr(shards, "safe_open", spy)
    return spy


def test_index_maps_every_state_dict_tensor_to_its_shard(model, sharded_dir):
    weight_map = json.loads((sharded_dir / INDEX_FILE).read_text())["weight_map"]
    index = CheckpointIndex(sharded_dir)
    state = model.state_dict()

    assert set(index.names()) == set(state) == set(weight_map)
    assert len(index) == len(state)
    assert index.shard_files() == sorted(set(weight_map.values()))
    assert len(index.shard_files()) > 1
    assert index.names() == [n for shard in index.shard_files() for n in index.tensors_in(shard)]
    for name, tensor in state.items():
        assert name in index
        assert index.info(name).shard == weight_map[name]
        assert index.shape(name) == tuple(tensor.shape)
        assert index.dtype(name) == tensor.dtype
        assert index.info(name).nbytes == tensor.numel() * tensor.element_size()
    assert "no.such.weight" not in index
    with pytest.raises(KeyError, match="no.such.weight"):
        index.shape("no.such.weight")


def test_index_reads_headers_only(model, sharded_dir, tmp_path, spy):
    # Shards cut right after their headers still index: no tensor byte is needed, no handle is opened.
    for path in sharded_dir.iterdir():
        if path.suffix == ".safetensors":
            data = path.read_bytes()
            (length,) = struct.unpack("<Q", data[:8])
            (tmp_path / path.name).write_bytes(data[: 8 + length])
        else:
            shutil.copy(path, tmp_path / path.name)
    index = CheckpointIndex(tmp_path)
    assert {n: index.shape(n) for n in index.names()} == {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert spy.opened == []


def test_get_reads_each_tensor_bit_for_bit(model, sharded_dir, spy):
    index = CheckpointIndex(sharded_dir)
    for name, tensor in model.state_dict().items():
        assert same_bits(index.get(name), tensor), name
    assert spy.max_open == 1


def test_iteration_opens_one_shard_at_a_time(model, sharded_dir, spy):
    index = CheckpointIndex(sharded_dir)
    state = model.state_dict()
    seen = []
    for name, tensor in index.iter_tensors():
        assert spy.open_now == 1
        assert spy.opened[-1] == index.info(name).shard
        assert same_bits(tensor, state[name])
        seen.append(name)
    assert seen == index.names()
    assert spy.opened == index.shard_files()  # each shard opened exactly once, in order
    assert spy.max_open == 1 and spy.open_now == 0


def test_single_file_checkpoint(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert not (tmp_path / INDEX_FILE).exists()
    index = CheckpointIndex(tmp_path)
    assert index.shard_files() == [SINGLE_FILE]
    assert index.tensors_in(SINGLE_FILE) == index.names()
    assert dict(index.iter_tensors()).keys() == model.state_dict().keys()


def test_writer_with_one_byte_cap_gives_each_tensor_a_shard(model, sharded_dir, tmp_path):
    index = CheckpointIndex(sharded_dir)
    out = tmp_path / "out"
    writer = ShardWriter(out, 1, metadata={"lorasb": "{}"})
    for name, tensor in index.iter_tensors():
        writer.add(name, tensor)
    written = writer.finalize()

    count = len(index)
    shard_names = [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    assert [p.name for p in written] == [*shard_names, INDEX_FILE]
    assert sorted(p.name for p in out.iterdir()) == sorted([*shard_names, INDEX_FILE])  # no temporary files left
    saved = json.loads((out / INDEX_FILE).read_text())
    assert saved["weight_map"] == dict(zip(index.names(), shard_names))
    assert saved["metadata"]["total_size"] == sum(index.info(n).nbytes for n in index.names())
    for shard, name in zip(shard_names, index.names()):
        metadata = shards.read_header(out / shard)["__metadata__"]
        hashes = json.loads(metadata.pop(shards.SHARD_HASH_KEY))  # each shard records its own tensors' hashes
        assert metadata == {"format": "pt", "lorasb": "{}"}
        assert hashes == {name: shards.tensor_hash(index.get(name))} == {name: saved["metadata"]["tensor_sha256"][name]}

    reread = CheckpointIndex(out)
    state = model.state_dict()
    assert reread.names() == index.names()
    for name, tensor in reread.iter_tensors():
        assert same_bits(tensor, state[name])


def test_writer_flushes_before_the_cap_and_buffers_at_most_one_shard(model, sharded_dir, tmp_path, monkeypatch):
    cap = 20_000
    saves: list[int] = []  # tensor bytes of each shard as it is saved
    original = shards.save_file

    def recording_save_file(tensors, filename, metadata):
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= cap or len(tensors) == 1
        saves.append(nbytes)
        original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(shards, "save_file", recording_save_file)
    index = CheckpointIndex(sharded_dir)
    writer = ShardWriter(tmp_path, cap)
    for name, tensor in index.iter_tensors():
        writer.add(name, tensor)
    flushed_before_finalize = len(saves)
    assert flushed_before_finalize >= 2
    assert not any(p.name.startswith("model") for p in tmp_path.iterdir())  # final names only at finalize
    written = writer.finalize()
    assert len(written) == len(saves) + 1
    assert sum(saves) == sum(index.info(n).nbytes for n in index.names())


def test_writer_fills_shards_up_to_the_cap_exactly(tmp_path):
    # float32 sizes in bytes: a 8, b 8 fill a 16-byte shard exactly; c 40 is over the cap, alone; d 8 + e 4.
    sizes = {"a": 2, "b": 2, "c": 10, "d": 2, "e": 1}
    writer = ShardWriter(tmp_path, 16)
    for name, numel in sizes.items():
        writer.add(name, torch.ones(numel))
    writer.finalize()
    index = CheckpointIndex(tmp_path)
    assert [index.tensors_in(s) for s in index.shard_files()] == [["a", "b"], ["c"], ["d", "e"]]


def test_writer_round_trip_loads_with_from_pretrained(model, sharded_dir, tmp_path):
    out = tmp_path / "merged"
    writer = ShardWriter(out, parse_size("30KB"))
    for name, tensor in CheckpointIndex(sharded_dir).iter_tensors():
        writer.add(name, tensor)
    writer.finalize()
    shutil.copy(sharded_dir / "config.json", out)

    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_writer_single_shard_has_hf_name_and_no_index(model, tmp_path):
    writer = ShardWriter(tmp_path, parse_size("5GB"))
    for name, tensor in model.state_dict().items():
        writer.add(name, tensor)
    assert writer.finalize() == [tmp_path / SINGLE_FILE]
    assert [p.name for p in tmp_path.iterdir()] == [SINGLE_FILE]
    state = model.state_dict()
    assert all(same_bits(t, state[n]) for n, t in CheckpointIndex(tmp_path).iter_tensors())


def test_writer_leaves_no_files_when_interrupted(model, tmp_path):
    with pytest.raises(RuntimeError, match="interrupted"), ShardWriter(tmp_path, 1) as writer:
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor)
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_a_directory_with_weights(model, sharded_dir):
    with pytest.raises(BadInputError, match="already holds weights"):
        ShardWriter(sharded_dir, 1)


def test_writer_rejects_a_name_added_twice(tmp_path):
    writer = ShardWriter(tmp_path, 1)
    writer.add("w", torch.zeros(2))
    with pytest.raises(ValueError, match="added twice"):
        writer.add("w", torch.zeros(2))


def test_pickle_checkpoint_is_refused_without_unpickling(model, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(BadInputError) as info:
        CheckpointIndex(tmp_path)
    line = info.value.one_line()
    assert "not safetensors" in line and "pytorch_model.bin" in line
    assert "save_pretrained" in line and "safe_serialization=True" in line
    assert "\n" not in line


def test_directory_without_weights(tmp_path):
    with pytest.raises(BadInputError, match="no model.safetensors"):
        CheckpointIndex(tmp_path)
    with pytest.raises(BadInputError, match="not found"):
        CheckpointIndex(tmp_path / "missing")


def test_index_naming_a_missing_shard(sharded_dir, tmp_path):
    for path in sharded_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "model-00002-of-00007.safetensors").unlink()
    with pytest.raises(BadInputError, match="missing") as info:
        CheckpointIndex(tmp_path)
    assert info.value.path.endswith("model-00002-of-00007.safetensors")


def test_corrupt_shard_header(sharded_dir, tmp_path):
    for path in sharded_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "model-00001-of-00007.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(BadInputError, match="not a readable safetensors file"):
        CheckpointIndex(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("20KB", 20_000),
        ("2GiB", 2 * 2**30),
        ("1.5gib", 3 * 2**29),
        ("1 TB", 10**12),
        ("1234", 1234),
        (1234, 1234),
        ("7B", 7),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "five GB", "5XB", "-1", "0", "0.1B", "1e9", "nan", "5 G B"])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(BadInputError, match="invalid size"):
        parse_size(text)
