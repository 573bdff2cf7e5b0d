"""`estimate --dry-run` per device: --world-size, --strategy ddp|fsdp and --quantize, on Mistral-7B's real config
(meta device, no weights), checked against sizes counted by hand from the config."""

from __future__ import annotations

import json

import pytest
from test_mistral import MISTRAL_7B

from lorasb_cli import cli, plan

HIDDEN, KV, MLP, VOCAB, LAYERS = 4096, 1024, 14336, 32000, 32
# (m, n) of the 7 targets of one decoder layer: q, o; k, v; gate, up, down
LAYER_LINEARS = [(HIDDEN, HIDDEN)] * 2 + [(KV, HIDDEN)] * 2 + [(MLP, HIDDEN)] * 2 + [(HIDDEN, MLP)]
LAYER_NORMS = 2 * HIDDEN
ROOT = 2 * VOCAB * HIDDEN + HIDDEN + 2 * 64  # embeddings, LM head (untied), final norm, two rotary buffers


@pytest.fixture(scope="module")
def mistral_config(tmp_path_factory):
    from transformers import MistralConfig

    folder = tmp_path_factory.mktemp("mistral-7b-config")
    MistralConfig(**MISTRAL_7B).save_pretrained(folder)
    return folder


def dry_run(folder, capsys, *options) -> dict:
    args = ["estimate", "-m", folder, "--dry-run", "--json", "--device", "cuda", "--dtype", "bfloat16"]
    args += ["--batch-size", "1", "--max-length", "16", "--accumulate-on", "device", *options]
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    return json.loads(out)


def items(plan_json: dict, stage: str) -> dict[str, int]:
    return {i["what"].split(" (")[0].split(",")[0]: i["bytes"] for i in plan_json["stages"][stage]["items"]}


def test_fsdp_shards_weights_and_accumulators_per_device(mistral_config, capsys):
    ddp = dry_run(mistral_config, capsys, "--world-size", "8", "--strategy", "ddp")
    fsdp = dry_run(mistral_config, capsys, "--world-size", "8", "--strategy", "fsdp")
    assert (fsdp["world_size"], fsdp["strategy"], fsdp["quantize"]) == (8, "fsdp", None)
    weights = 2 * (LAYERS * (sum(m * n for m, n in LAYER_LINEARS) + LAYER_NORMS) + ROOT)
    layer = 2 * (sum(m * n for m, n in LAYER_LINEARS) + LAYER_NORMS)
    for stage in ("estimate", "train"):
        whole, sharded = items(ddp, stage), items(fsdp, stage)
        assert whole["weights"] == weights  # ddp: the whole base on every device
        assert sharded["weights"] == -(-weights // 8)
        gathered = 2 * ROOT + layer  # the root unit and one decoder layer, less the device's own 1/8 of them
        assert sharded["gathered beyond the shard: the root unit"] == gathered - gathered // 8
        assert sharded["activations"] == whole["activations"]  # the batch is per device under both
    accumulators = 4 * LAYERS * sum(m * n for m, n in LAYER_LINEARS)
    assert items(ddp, "estimate")["accumulators"] == accumulators
    # Each target on one owner: 32 of each kind over 8 ranks balance exactly.
    assert items(fsdp, "estimate")["accumulators"] == accumulators // 8
    assert items(fsdp, "estimate")["the largest target's gradient on its way to its owner rank"] == 4 * MLP * HIDDEN
    for stage in ("estimate", "train"):
        assert fsdp["per_device_bytes"][stage]["host"] == ddp["per_device_bytes"][stage]["host"] == 0
        assert fsdp["per_device_bytes"][stage]["gpu"] < ddp["per_device_bytes"][stage]["gpu"]
    assert fsdp["per_device_bytes"]["merge"] == ddp["per_device_bytes"]["merge"]  # one process on the host
    assert fsdp["per_device_bytes"]["merge"]["gpu"] == 0


def test_nf4_plan_holds_half_a_byte_per_linear_weight(mistral_config, capsys):
    bf16 = dry_run(mistral_config, capsys)
    nf4 = dry_run(mistral_config, capsys, "--quantize", "nf4")
    assert bf16["world_size"] == 1 and nf4["quantize"] == "nf4"
    packed = sum((m * n) // 2 + 4 * (m * n // 64) for m, n in LAYER_LINEARS)  # 2 weights a byte, absmax per 64
    assert items(nf4, "train")["weights"] == LAYERS * (packed + 2 * LAYER_NORMS) + 2 * ROOT
    assert items(nf4, "train")["the largest quantized weight"] == 2 * MLP * HIDDEN  # dense bf16 copy in a matmul
    for stage in ("estimate", "train"):
        assert nf4["per_device_bytes"][stage]["gpu"] < bf16["per_device_bytes"][stage]["gpu"]
    assert items(nf4, "estimate")["accumulators"] == items(bf16, "estimate")["accumulators"]  # G is not quantized


def test_owner_loads_balance_by_size():
    assert sorted(plan.owner_loads([5, 4, 3, 3, 3], 2)) == [8, 10]
    assert sorted(plan.owner_loads([7, 1, 1, 1], 3)) == [1, 2, 7]
    assert plan.owner_loads([3, 2], 1) == [5]
