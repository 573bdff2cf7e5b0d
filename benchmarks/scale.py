"""estimate on 1 process against 2 (torchrun, gloo, CPU): the time ratio, and that both give the same G.

`lorasb estimate --model smollm2-135m --data arithmetic --size 200 --samples 32 --raw --json` (float32, all-linear
targets), once as one process and once under `torchrun --nproc-per-node 2` (16 samples per rank, G all-reduced),
`OMP_NUM_THREADS=1` in every process so that two processes on a 2-core machine do not share cores. `--rounds`
rounds alternate the order (1 then 2, 2 then 1, ...); medians are reported. "estimate" is the stage's own
`seconds` (forward, backward, accumulation, all-reduce); wall includes interpreter start-up and model loading.

    python -m benchmarks.scale              # results/scale.md and the scale section of RESULTS.md
    python -m benchmarks.scale --rounds 1   # one run each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from benchmarks.common import key_values, markdown_table, run_facts, write_result, write_section
from lorasb_cli import artifacts

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517"]


def run_estimate(processes: int, out: Path, args: argparse.Namespace) -> dict:
    """One estimate job on `processes` processes: its --json summary plus the wall time."""
    command = [
        "-m",
        "lorasb_cli",
        "estimate",
        "--model",
        args.model,
        "--data",
        args.data,
        "--size",
        str(args.size),
        "--samples",
        str(args.samples),
        "--batch-size",
        str(args.batch_size),
        "--raw",
        "--json",
        "-q",
        "--seed",
        "0",
        "-o",
        str(out),
    ]
    argv = [sys.executable, *command] if processes == 1 else [*TORCHRUN, *command]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{processes}-process estimate failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    if len(lines) != 1:
        raise RuntimeError(f"{processes}-process estimate printed {len(lines)} lines, not one: {lines}")
    result = json.loads(lines[0])
    print(f"  {processes} process(es): estimate {result['seconds']:.1f} s, wall {wall:.1f} s", file=sys.stderr)
    return {**result, "wall": wall}


def compare_sums(one: Path, two: Path) -> tuple[float, int, int]:
    """(max over modules of max |G₂ − G₁| / max |G₁|, entries whose sign differs, entries)."""
    a, b = artifacts.Artifact(one), artifacts.Artifact(two)
    worst, differ, total = 0.0, 0, 0
    for name in a.names:
        g1, g2 = a.get(name, torch.float32), b.get(name, torch.float32)
        worst = max(worst, float((g2 - g1).abs().max() / g1.abs().max()))
        differ += int((torch.sign(g1) != torch.sign(g2)).sum())
        total += g1.numel()
    return worst, differ, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="arithmetic")
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    load_start = psutil.getloadavg()[0]
    started = time.perf_counter()
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.rounds):
            for processes in (1, 2) if i % 2 == 0 else (2, 1):
                out = Path(folder) / f"g{processes}-{i}.safetensors"
                runs[processes].append(run_estimate(processes, out, args))
        difference, differ, total = compare_sums(Path(folder) / "g1-0.safetensors", Path(folder) / "g2-0.safetensors")
    seconds = {p: statistics.median(r["seconds"] for r in rs) for p, rs in runs.items()}
    wall = {p: statistics.median(r["wall"] for r in rs) for p, rs in runs.items()}
    rows = [
        [p, f"{seconds[p]:.1f}", f"{wall[p]:.1f}", f"{seconds[p] / seconds[1]:.2f}", f"{wall[p] / wall[1]:.2f}"]
        for p in (1, 2)
    ]
    text = "\n\n".join(
        [
            "## Scale: estimate on 1 vs 2 processes (SmolLM2-135M, CPU, gloo)",
            (
                f"`lorasb estimate --model {args.model} --data {args.data} --size {args.size} --samples {args.samples} "
                f"--batch-size {args.batch_size} --raw` (float32, all-linear targets), as one process and under `torchrun "
                f"--nproc-per-node 2` ({args.samples // 2} samples per rank, G all-reduced), `OMP_NUM_THREADS=1` per "
                f"process; medians of {args.rounds} rounds, the order alternating. estimate = the stage's own `seconds` "
                "(forward, backward, accumulation, all-reduce); wall includes start-up and loading."
            ),
            markdown_table(
                ["processes", "estimate (s)", "wall (s)", "estimate ratio to 1 process", "wall ratio"], rows
            ),
            (
                f"Same G: max |G₂ − G₁| / max |G₁| over modules is {difference:.1e} (float32 summation order); {differ:,} of "
                f"{total:,} signs differ. Each job printed one line on stdout."
            ),
            key_values(run_facts("scale", started, load_start)),
        ]
    )
    print(text)
    write_result("scale", text)
    write_section(RESULTS_PATH, "scale", text)


if __name__ == "__main__":
    main()
