"""Merge memory: peak RSS of `lorasb merge` against the size of a multi-shard checkpoint (docs/design.md §4).

Builds a randomly initialized Llama (hidden 1024, 8 layers, vocab 16000: ~500 MB float32) saved in 8 shards
and a rank-32 all-linear LoRA-SB adapter, then runs each merge in a fresh subprocess. The subprocess measures
its RSS after imports, resets the kernel's peak-RSS mark (/proc/self/clear_refs), merges, and reads the peak:
merge memory = peak RSS − RSS after imports, in largest shards (target ≤ 2.5) and as a fraction of the model,
the worst of 3 runs. A "warm" run first merges a tiny model in the same process, so that the one-off cost of
a first merge (torch kernels and allocator pools paged in) is left out and what remains scales with the
checkpoint; a "no-trim" run shows what the merge's glibc malloc_trim calls save.
Writes benchmarks/results/merge.md.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.merge
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, key_values, machine_info, markdown_table, write_result

WORK = ROOT / "benchmarks" / "out" / "merge"
RANK = 32
SHARD_SIZE = "75MB"  # gives 8 shards: the two 65.5 MB embedding matrices set the largest shard
TARGET_SHARDS = 2.5
REPEATS = 3
BIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "vocab_size": 16000}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 256}


def rss_bytes(field: str) -> int:
    """VmRSS (current) or VmHWM (peak since the last reset) of this process."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status)[1]) * 1024


def child(work: str, options: str, mode: str) -> None:
    """Run one merge of WORK/big in this fresh process and print its memory and time.

    `mode`: cold (right after imports), warm (after a tiny merge), or no-trim (cold, glibc's malloc_trim unused).
    """
    from lorasb_cli import merge

    work_dir = Path(work)
    if mode == "no-trim":
        merge._malloc_trim = None
    if mode == "warm":
        tiny = work_dir / "tiny"
        merge.merge(
            merge.MergeConfig(
                adapter=str(tiny / "run"), out=str(tiny / "merged"), model=str(tiny / "base"), **json.loads(options)
            )
        )
        shutil.rmtree(tiny / "merged")
    baseline = rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS mark := current RSS
    start = time.perf_counter()
    big = work_dir / "big"
    merge.merge(
        merge.MergeConfig(
            adapter=str(big / "run"), out=str(big / "merged"), model=str(big / "base"), **json.loads(options)
        )
    )
    wall = time.perf_counter() - start
    print(json.dumps({"baseline": baseline, "peak": rss_bytes("VmHWM"), "wall": wall}))


def build(root: Path, dims: dict, rank: int, shard_size: str) -> int:
    """Random Llama checkpoint in `root`/base, a rank-`rank` adapter on every linear layer in `root`/run.

    B and A are orthonormal (QR), R small and random. Returns the number of adapted modules.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorasb_cli import adapter, metadata, models

    config = LlamaConfig(**dims, num_attention_heads=16, num_key_value_heads=8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base", max_shard_size=shard_size)
    shapes = models.target_shapes(model, models.resolve_targets(model, "all-linear"))
    del model

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for module, (m, n) in shapes.items():
        tensors[f"{module}.lora_B"] = torch.linalg.qr(torch.randn(m, rank, generator=gen))[0].contiguous()
        tensors[f"{module}.lora_R"] = 1e-3 * torch.randn(rank, rank, generator=gen)
        tensors[f"{module}.lora_A"] = torch.linalg.qr(torch.randn(n, rank, generator=gen))[0].T.contiguous()
    (root / "run").mkdir(parents=True)
    meta = {
        "base_model": {"id": str(root / "base"), "fingerprint": models.fingerprint(shapes)},
        "targets": "all-linear",
        "method": "lorasb",
        "rank": rank,
        "scale": 1.0,
    }
    adapter.save_adapter(root / "run", tensors, metadata.AdapterMeta.from_json(meta))
    return len(shapes)


def measure(options: dict, mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.merge", "--child", str(WORK), json.dumps(options), mode],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    shutil.rmtree(WORK / "big" / "merged")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# (label, merge options, process state): each measured REPEATS times in fresh subprocesses.
KEEP, BF16, RESHARD = {}, {"dtype": "bfloat16"}, {"max_shard_size": SHARD_SIZE}
RUNS = [
    ("keep the base's shards (float32)", KEEP, "cold"),
    ("keep the base's shards (float32)", KEEP, "warm"),
    ('`dtype="bfloat16"`', BF16, "cold"),
    ('`dtype="bfloat16"`', BF16, "warm"),
    (f'`max_shard_size="{SHARD_SIZE}"` (re-shard)', RESHARD, "cold"),
    (f'`max_shard_size="{SHARD_SIZE}"` (re-shard)', RESHARD, "warm"),
    ("keep the base's shards (float32)", KEEP, "no-trim"),
]


def measure_rows(model_size: int, largest: int) -> list[list[str]]:
    """A table row per entry of RUNS: merge memory (the worst of REPEATS), in largest shards, wall time."""
    mib = 2**20
    rows = []
    for label, options, mode in RUNS:
        # The allocator's reuse of freed memory varies from run to run: report the worst of REPEATS.
        results = [measure(options, mode) for _ in range(REPEATS)]
        used = max(r["peak"] - r["baseline"] for r in results)
        shards_worth = used / largest
        met = "met" if shards_worth <= TARGET_SHARDS else "MISSED"
        rows.append(
            [
                label,
                mode,
                f"{used / mib:.0f}",
                f"**{shards_worth:.2f}** ({met})" if mode != "no-trim" else f"{shards_worth:.2f}",
                f"{used / model_size:.2f}",
                f"{max(r['baseline'] for r in results) / mib:.0f}",
                f"{statistics.median(r['wall'] for r in results):.2f}",
            ]
        )
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # no options: --help
    import safetensors

    from lorasb_cli import shards

    shutil.rmtree(WORK, ignore_errors=True)
    modules = build(WORK / "big", BIG, RANK, SHARD_SIZE)
    build(WORK / "tiny", TINY, 8, SHARD_SIZE)
    index = shards.CheckpointIndex(WORK / "big" / "base")
    shard_sizes = [sum(index.info(n).nbytes for n in index.tensors_in(s)) for s in index.shard_files()]
    model_size, largest = sum(shard_sizes), max(shard_sizes)

    rows = measure_rows(model_size, largest)
    mib = 2**20

    headers = ["merge", "process", "merge memory (MiB)", f"in largest shards (target ≤ {TARGET_SHARDS})"]
    headers += ["fraction of model", "RSS before (MiB)", "wall (s, median)"]
    setup = {
        **machine_info(),
        "safetensors": safetensors.__version__,
        "model": "random LlamaForCausalLM float32: 8 layers, hidden 1024, MLP 2816, heads 16/8 kv, vocab 16000",
        "checkpoint": f"{model_size / mib:.0f} MiB in {len(shard_sizes)} shards, largest {largest / mib:.1f} MiB",
        "adapter": f"rank {RANK} on all {modules} linear layers (all-linear)",
        "runs": f"each merge in a fresh subprocess; worst memory of {REPEATS} runs, median wall time",
    }
    text = (
        "# merge: peak memory of a streamed merge vs the checkpoint\n\n"
        f"{markdown_table(headers, rows)}\n\n"
        "merge memory = peak RSS − RSS just before the merge (the kernel's peak mark is reset there). "
        "cold: right after imports; warm: after merging a tiny model in the same process, which leaves out the "
        "one-off cost of paging in torch's kernels; no-trim: cold, with the merge's glibc `malloc_trim` calls "
        "disabled, i.e. what freed tensors kept in the heap would cost.\n\n"
        f"{key_values(setup)}\n\n"
        "Reproduce: `HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.merge`\n"
    )
    print(f"wrote {write_result('merge', text)}", file=sys.stderr)
    print(text)
    shutil.rmtree(WORK)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:5])
    else:
        main()
