"""merge: merged and PEFT-exported logits equal the adapter's, shard layout kept, bounded memory, atomic output."""

from __future__ import annotations

import json
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import artifact_meta, make_llama, save_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lorasb_cli import adapter, bundled, merge, methods, models, shards
from lorasb_cli.errors import BadInputError, IncompatibleArtifactError, NonFiniteError

RANK = 4


@dataclass
class Setup:
    base_dir: Path  # single model.safetensors
    sharded_dir: Path  # the same weights in 14 shards (max_shard_size 20 KB)
    adapter_dir: Path
    inputs: torch.Tensor
    base_logits: torch.Tensor
    adapter_logits: torch.Tensor


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen))
    return q


def build_adapter(
    base_dir: Path,
    run_dir: Path,
    *,
    seed: int = 0,
    scale: float = 1.0,
    ranks: dict[str, int] | None = None,
    r_scale: float = 0.5,
    head_labels: int | None = None,
):
    """Inject orthonormal B, A and a non-symmetric R into the base; write the adapter; return the adapted model.

    `head_labels` builds a sequence classifier whose trained head (`score.weight`) the adapter carries.
    """
    auto = AutoModelForSequenceClassification if head_labels else AutoModelForCausalLM
    kwargs = {"num_labels": head_labels} if head_labels else {}
    model = auto.from_pretrained(base_dir, dtype=torch.float32, **kwargs).eval()
    modules = models.resolve_targets(model, "all-linear")
    shapes = models.target_shapes(model, modules)
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for module, (m, n) in shapes.items():
        r = (ranks or {}).get(module, RANK)
        lora_R = r_scale * torch.randn(r, r, generator=gen)
        factors[module] = (_orthonormal(m, r, gen), lora_R, _orthonormal(n, r, gen).T)
    adapter.inject(model, factors, scale=scale)
    tensors = adapter.adapter_tensors(model)
    if head_labels:
        model.score.weight.data = torch.randn(model.score.weight.shape, generator=gen)
        tensors["score.weight"] = model.score.weight.detach().clone()
    config = {
        "base_model": {"id": str(base_dir), "fingerprint": models.fingerprint(shapes)},
        "targets": "all-linear",
        "method": "lorasb",
        "rank": RANK,
        "scale": scale,
        # A trained head is declared as train declares it: an adapter's other tensors are refused.
        **(
            models.head_meta(models.HeadSpec.from_model(model, [str(i) for i in range(head_labels)]))
            if head_labels
            else {}
        ),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    adapter.save_adapter(run_dir, tensors, artifact_meta("adapter", **config))
    return model


def logits(model, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).logits


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("merge")
    base, tokenizer = make_llama(seed=3)
    base_dir = save_model(base, tokenizer, root / "base")
    sharded_dir = save_model(base, tokenizer, root / "sharded", max_shard_size="20KB")
    inputs = torch.randint(4, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    adapted = build_adapter(base_dir, root / "run")
    return Setup(base_dir, sharded_dir, root / "run", inputs, logits(base, inputs), logits(adapted, inputs))


def assert_logits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_merged_model_reproduces_adapter_logits_and_loads_alone(setup, tmp_path):
    calls = []
    # model=None: the base comes from the adapter's config.
    out = merge.merge(
        merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(tmp_path / "merged")),
        progress=lambda d, t: calls.append((d, t)),
    )
    assert out == tmp_path / "merged"
    merged_logits = logits(load(out), setup.inputs)
    assert_logits_equal(merged_logits, setup.adapter_logits)
    assert (merged_logits - setup.base_logits).abs().max() > 1e-2
    assert (
        AutoTokenizer.from_pretrained(out)("the cat sat").input_ids
        == AutoTokenizer.from_pretrained(setup.base_dir)("the cat sat").input_ids
    )

    base_files = {p.name for p in setup.base_dir.iterdir()}
    assert {p.name for p in out.iterdir()} == base_files
    assert (out / "config.json").read_text() == (setup.base_dir / "config.json").read_text()
    with safe_open(out / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["lorasb"])["merged_from"]["rank"] == RANK
    assert calls[-1][0] == calls[-1][1] == len(calls) == len(shards.CheckpointIndex(out))
    assert leftovers(tmp_path) == []


def test_merge_weight_uses_b_r_a_in_that_order():
    gen = torch.Generator().manual_seed(0)
    w, b, r, a = (torch.randn(*s, generator=gen) for s in ((6, 5), (6, 3), (3, 3), (3, 5)))
    merged = merge.merge_weight(w.to(torch.bfloat16), b, r, a, scale=0.5)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged, (w.to(torch.bfloat16).float() + 0.5 * b @ r @ a).to(torch.bfloat16))


def test_peft_export_reproduces_adapter_logits(setup, tmp_path):
    import peft

    out = merge.merge(merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(tmp_path / "peft"), format="peft"))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert f"--max-lora-rank 8 (rank {RANK})" in (out / "README.md").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = peft.PeftConfig.from_pretrained(str(out))
    assert config.r == config.lora_alpha == RANK and config.task_type == "CAUSAL_LM"
    assert config.base_model_name_or_path == str(setup.base_dir)
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
    with safe_open(out / "adapter_model.safetensors", framework="pt") as f:
        assert f.metadata()["format"] == "pt"
    model = peft.PeftModel.from_pretrained(load(setup.base_dir), str(out)).eval()
    assert_logits_equal(logits(model, setup.inputs), setup.adapter_logits)


def test_peft_export_of_an_alias_loads_through_peft_auto_class_offline(setup, tmp_path, monkeypatch):
    """base_model_name_or_path is the absolute folder an alias (here a bundled one) loads from, never the alias,
    which AutoPeftModelForCausalLM would look up on the hub."""
    from peft import AutoPeftModelForCausalLM

    alias = bundled.BundledModel(
        "tiny-llama", "a tiny Llama", "tiny-llama-pkg", "0.1", "tiny_llama_pkg", "", "causal-lm"
    )
    monkeypatch.setitem(bundled.BUNDLED, alias.alias, alias)
    monkeypatch.setattr(bundled, "source_path", lambda model: setup.base_dir if model is alias else None)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    config = merge.MergeConfig(adapter=str(setup.adapter_dir), model=alias.alias, out="export", format="peft")
    assert merge.merge(config) == Path("export")
    exported = json.loads((tmp_path / "work" / "export" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == str(setup.base_dir.absolute())

    monkeypatch.chdir(tmp_path)  # from elsewhere, and offline (conftest): the export names a folder that loads
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "work" / "export"), dtype=torch.float32).eval()
    assert_logits_equal(logits(model, setup.inputs), setup.adapter_logits)

    # The GGUF models' converted folders are recorded the same way: absolute, even under a relative LORASB_HOME.
    monkeypatch.setenv("LORASB_HOME", "cache")
    assert bundled.cache_home() == tmp_path / "cache"


def test_serving_hints_name_the_smallest_vllm_rank_that_holds_the_adapter():
    assert (
        merge.serving_hints(96, variant=adapter.PLAIN, modules_to_save=[])[0]
        == "vLLM: --enable-lora --max-lora-rank 128 (rank 96)"
    )
    assert "--max-lora-rank 8 " in merge.serving_hints(8, variant=adapter.PLAIN, modules_to_save=[])[0]
    assert "--max-lora-rank 320 " in merge.serving_hints(257, variant=adapter.PLAIN, modules_to_save=[])[0]
    assert "merge instead" in merge.serving_hints(600, variant=adapter.PLAIN, modules_to_save=[])[0]
    hints = merge.serving_hints(32, variant=methods.get_method("dora").layer_variant, modules_to_save=["score"])
    assert any("DoRA" in h for h in hints) and any("score" in h for h in hints)


def test_peft_export_with_mixed_ranks_and_scale(setup, tmp_path):
    import peft

    ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 6}
    adapted = build_adapter(setup.base_dir, tmp_path / "run", seed=5, scale=0.5, ranks=ranks)
    out = merge.merge(merge.MergeConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "peft"), format="peft"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, 2)
    assert config["rank_pattern"] == ranks and config["alpha_pattern"] == {k: v / 2 for k, v in ranks.items()}
    model = peft.PeftModel.from_pretrained(load(setup.base_dir), str(out)).eval()
    assert_logits_equal(logits(model, setup.inputs), logits(adapted, setup.inputs))


def test_trained_head_is_merged_and_exported(setup, tmp_path):
    """A classification head the causal-LM base lacks is added by the merge and is PEFT's modules_to_save."""
    import peft

    adapted = build_adapter(setup.base_dir, tmp_path / "run", seed=7, head_labels=3)
    expected = logits(adapted, setup.inputs)

    merged = merge.merge(merge.MergeConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "merged")))
    model = AutoModelForSequenceClassification.from_pretrained(merged, num_labels=3).eval()
    assert_logits_equal(logits(model, setup.inputs), expected)

    out = merge.merge(merge.MergeConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "peft"), format="peft"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    base = AutoModelForSequenceClassification.from_pretrained(setup.base_dir, num_labels=3)
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert_logits_equal(logits(model, setup.inputs), expected)


def test_sharded_merge_keeps_layout_and_holds_at_most_two_shards(setup, tmp_path, monkeypatch):
    base = shards.CheckpointIndex(setup.sharded_dir)
    assert len(base.shard_files()) >= 8

    # (shard, weak reference) for every tensor read from a shard or saved into one: a shard counts as held
    # while any of its tensors is alive. Tensors are freed by reference counting, so this is exact.
    tracked: list[tuple[str, weakref.ref]] = []
    peak = 0

    def note(shard: str, tensor: torch.Tensor) -> None:
        nonlocal peak
        tracked.append((shard, weakref.ref(tensor)))
        peak = max(peak, len({s for s, ref in tracked if ref() is not None}))

    real_get, real_save = shards.CheckpointIndex.get, merge.save_file

    def get(self, name):
        tensor = real_get(self, name)
        note(self.info(name).shard, tensor)
        return tensor

    def save_file(tensors, filename, metadata=None):
        for tensor in tensors.values():
            note(Path(filename).name, tensor)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(shards.CheckpointIndex, "get", get)
    monkeypatch.setattr(merge, "save_file", save_file)
    out = merge.merge(
        merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(tmp_path / "merged"), model=str(setup.sharded_dir))
    )
    assert 1 <= peak <= 2, f"{peak} shards held at once"

    merged = shards.CheckpointIndex(out)
    assert merged.shard_files() == base.shard_files()
    for shard in base.shard_files():
        assert merged.tensors_in(shard) == base.tensors_in(shard)
    index = shards.INDEX_FILE
    merged_index, base_index = (json.loads((d / index).read_text()) for d in (out, setup.sharded_dir))
    hashes = merged_index["metadata"].pop(shards.INDEX_HASH_KEY)  # the merged tensors' own, one per tensor
    assert merged_index == base_index and set(hashes) == set(base_index["weight_map"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in setup.sharded_dir.iterdir())
    assert_logits_equal(logits(load(out), setup.inputs), setup.adapter_logits)


def test_max_shard_size_reshards(setup, tmp_path):
    out = merge.merge(
        merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(tmp_path / "merged"), max_shard_size="50KB")
    )
    index = shards.CheckpointIndex(out)
    count = len(index.shard_files())
    assert count > 1
    assert index.shard_files() == [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
    for shard in index.shard_files():
        names = index.tensors_in(shard)
        assert len(names) == 1 or sum(index.info(n).nbytes for n in names) <= 50_000
    assert not (out / "model.safetensors").exists()
    assert_logits_equal(logits(load(out), setup.inputs), setup.adapter_logits)


def test_bfloat16_output(setup, tmp_path):
    fp32 = merge.merge(
        merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(tmp_path / "fp32"), model=str(setup.sharded_dir))
    )
    out = merge.merge(
        merge.MergeConfig(
            adapter=str(setup.adapter_dir), out=str(tmp_path / "bf16"), model=str(setup.sharded_dir), dtype="bfloat16"
        )
    )
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged, reference = shards.CheckpointIndex(out), shards.CheckpointIndex(fp32)
    assert {merged.dtype(n) for n in merged.names()} == {torch.bfloat16}
    name = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(merged.get(name), reference.get(name).to(torch.bfloat16))
    index = json.loads((out / shards.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(merged.info(n).nbytes for n in merged.names())
    fp32_index = json.loads((fp32 / shards.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] * 2 == fp32_index["metadata"]["total_size"]


def test_adapter_dir_without_adapter_file(setup, tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(BadInputError, match="adapter.safetensors"):
        merge.merge(
            merge.MergeConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "out"), model=str(setup.base_dir))
        )


def test_factors_for_another_model_are_refused_before_writing(setup, tmp_path):
    other, tokenizer = make_llama(hidden=32)
    other_dir = save_model(other, tokenizer, tmp_path / "other")
    build_adapter(other_dir, tmp_path / "run")
    expected = r"factors of 'model\.layers\.0\.mlp\.down_proj' are for a 32×64 weight, the base model's is 64×128"
    with pytest.raises(IncompatibleArtifactError, match=expected):
        merge.merge(
            merge.MergeConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "out"), model=str(setup.base_dir))
        )
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(setup, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(BadInputError, match="--overwrite"):
        merge.merge(merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(out)))
    assert (out / "old.txt").exists()
    merge.merge(merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(out), overwrite=True))
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["inside adapter", "base dir", "parent of adapter"])
def test_output_never_touches_an_input(setup, tmp_path, where):
    build_adapter(setup.base_dir, tmp_path / "runs" / "run")
    out = {
        "inside adapter": tmp_path / "runs" / "run" / "merged",
        "base dir": setup.base_dir,
        "parent of adapter": tmp_path / "runs",
    }[where]
    before = sorted(p.name for p in setup.base_dir.iterdir())
    with pytest.raises(BadInputError, match="would overwrite or write into"):
        merge.merge(merge.MergeConfig(adapter=str(tmp_path / "runs" / "run"), out=str(out), overwrite=True))
    assert sorted(p.name for p in setup.base_dir.iterdir()) == before
    assert (tmp_path / "runs" / "run" / "adapter.safetensors").is_file()


def test_pickle_checkpoint_is_refused(setup, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((setup.base_dir / "config.json").read_text())
    (bin_dir / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(BadInputError, match="not safetensors"):
        merge.merge(merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(tmp_path / "out"), model=str(bin_dir)))
    assert not (tmp_path / "out").exists()


def test_failure_mid_merge_leaves_nothing(setup, tmp_path, monkeypatch):
    real_save = merge.save_file
    saved = []

    def failing_save(tensors, filename, metadata=None):
        if saved:
            raise OSError("No space left on device")
        saved.append(filename)
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(merge, "save_file", failing_save)
    with pytest.raises(BadInputError, match=r"cannot write .* \(no space left on the device\)"):
        merge.merge(
            merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(tmp_path / "out"), model=str(setup.sharded_dir))
        )
    assert saved and not (tmp_path / "out").exists() and leftovers(tmp_path) == []

    # With --overwrite the old output survives a failed merge.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    saved.clear()
    with pytest.raises(BadInputError, match=r"cannot write .* \(no space left on the device\)"):
        merge.merge(
            merge.MergeConfig(
                adapter=str(setup.adapter_dir), out=str(tmp_path / "out"), model=str(setup.sharded_dir), overwrite=True
            )
        )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []


def test_overflow_is_a_non_finite_error(setup, tmp_path):
    build_adapter(setup.base_dir, tmp_path / "run", r_scale=1e8)
    with pytest.raises(NonFiniteError, match=r"merged weight of module 'model\.layers\.\d\.\w+\.\w+_proj'"):
        merge.merge(merge.MergeConfig(adapter=str(tmp_path / "run"), out=str(tmp_path / "out"), dtype="float16"))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_base_model_is_taken_from_the_adapter_or_refused_clearly(setup, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lora = adapter.load_adapter(setup.adapter_dir)
    tensors = {f"{m}.{s}": t for m, f in lora.factors.items() for s, t in zip(("lora_B", "lora_R", "lora_A"), f)}
    config = {k: lora.fields[k] for k in ("base_model", "targets", "method", "rank", "scale")}

    config["base_model"]["id"] = str(tmp_path / "gone")
    adapter.save_adapter(run, tensors, artifact_meta("adapter", **config))
    with pytest.raises(BadInputError, match="no longer exists.*--model"):
        merge.merge(merge.MergeConfig(adapter=str(run), out=str(tmp_path / "out")))

    config["base_model"]["id"] = "lorasb-tests/not-a-cached-model"
    adapter.save_adapter(run, tensors, artifact_meta("adapter", **config))
    with pytest.raises(BadInputError, match="cannot download base model.*local model directory"):
        merge.merge(merge.MergeConfig(adapter=str(run), out=str(tmp_path / "out")))
    # A PEFT export needs no base weights: it works offline from a hub id.
    out = merge.merge(merge.MergeConfig(adapter=str(run), out=str(tmp_path / "peft"), format="peft"))
    exported = json.loads((out / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == config["base_model"]["id"]

    merged = merge.merge(merge.MergeConfig(adapter=str(run), out=str(tmp_path / "out"), model=str(setup.base_dir)))
    assert_logits_equal(logits(load(merged), setup.inputs), setup.adapter_logits)


def test_bad_options(setup, tmp_path):
    with pytest.raises(BadInputError, match="did you mean 'peft'"):
        merge.merge(merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(tmp_path / "out"), format="pfet"))
    with pytest.raises(BadInputError, match="unknown --dtype"):
        merge.merge(merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(tmp_path / "out"), dtype="int8"))
    with pytest.raises(BadInputError, match="hf only"):
        merge.merge(
            merge.MergeConfig(
                adapter=str(setup.adapter_dir), out=str(tmp_path / "out"), format="peft", dtype="bfloat16"
            )
        )
    with pytest.raises(BadInputError, match="invalid size"):
        merge.merge(merge.MergeConfig(adapter=str(setup.adapter_dir), out=str(tmp_path / "out"), max_shard_size="lots"))
    assert list(tmp_path.iterdir()) == []
