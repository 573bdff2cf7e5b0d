"""Training step time and peak memory of LoRA-SB against PEFT LoRA at the same rank and targets (docs/design.md §1, §4).

On a randomly initialized Llama (float32, CPU) and one fixed batch of random tokens, both variants adapt the same
all-linear targets (`lorasb_cli.models.resolve_targets(model, "all-linear")`) at the same rank:

- LoRA-SB:   `lorasb_cli.adapter.inject` with random orthonormal B (m×r), A (r×n) and a random R (r×r);
             only the Rs are trained;
- PEFT LoRA: `peft.get_peft_model` with `LoraConfig(r, lora_alpha=r, target_modules=<the same modules>,
             lora_dropout=0.0)`; A and B are trained.

A step is the model's own causal-LM loss (labels = input ids) forward, backward, `AdamW.step()` and
`zero_grad()`, with torch's default thread count (recorded).

Step time: both variants live in one process; after 2 warm-up steps of each, their steps alternate
(A B B A A B ...) so drift in CPU speed or load hits both alike; the median (and the fastest) step is reported.

Peak memory: each variant runs warm-up plus timed steps in its own fresh subprocess, which resets the kernel's
peak-RSS mark right after building the base model, records its RSS there, and reports the peak (VmHWM) at the end;
"working memory" is the difference (adapter, activations, gradients, optimizer state). The children run with
glibc's mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave RSS at once and the
peak is that of the live tensors, not of whatever freed heap the allocator happens to keep.

Targets at equal rank: LoRA-SB step time / PEFT LoRA step time ≤ 1.05 and LoRA-SB working memory / PEFT LoRA
working memory ≤ 1.0.

    python -m benchmarks.train                 # ranks 8 and 32; writes benchmarks/results/train.md
    python -m benchmarks.train --ranks 8,32,96
    python -m benchmarks.train --quick         # small smoke run, prints only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import psutil
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import ROOT, key_values, machine_info, markdown_table, verdict, write_result
from lorasb_cli.adapter import inject
from lorasb_cli.models import resolve_targets

TIME_TARGET = 1.05
MEMORY_TARGET = 1.0
WARMUP = 2
MIB = 2**20
# glibc serves allocations above this from mmap and unmaps them on free, so RSS follows the live tensors; its
# default threshold adapts to freed blocks and then keeps up to hundreds of MiB of freed heap resident.
MMAP_THRESHOLD = 64 * 1024


def build_base(args: argparse.Namespace) -> LlamaForCausalLM:
    """The seeded random Llama, float32, in train mode (it has no dropout)."""
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq_len,
    )
    return LlamaForCausalLM(config).float().train()


def orthonormal_columns(rows: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A random rows×rank matrix with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator))
    return q


def lorasb(model: LlamaForCausalLM, rank: int, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    named = dict(model.named_modules())
    factors = {}
    for path in resolve_targets(model, "all-linear"):
        m, n = named[path].weight.shape
        lora_B = orthonormal_columns(m, rank, generator)
        lora_A = orthonormal_columns(n, rank, generator).T
        factors[path] = (lora_B, torch.randn(rank, rank, generator=generator) * 1e-3, lora_A)
    inject(model, factors)
    return model


def peft_lora(model: LlamaForCausalLM, rank: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=resolve_targets(model, "all-linear"), lora_dropout=0.0)
    return get_peft_model(model, config)


VARIANTS: dict[str, Callable[[LlamaForCausalLM, int, int], nn.Module]] = {"LoRA-SB": lorasb, "PEFT LoRA": peft_lora}


def make_batch(args: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(1))


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_step(model: nn.Module, input_ids: torch.Tensor, lr: float) -> Callable[[], None]:
    """One training step: causal-LM loss forward, backward, AdamW step, zero_grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_rss_bytes() -> int:
    """This address space's peak RSS (VmHWM). Not `ru_maxrss`: that also keeps the parent's RSS at the fork that
    started this process, which `reset_peak_rss` cannot lower."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024  # KiB


def reset_peak_rss() -> None:
    """Lower the kernel's peak-RSS mark to the current RSS, so transients of imports and model building do not hide
    the training peak (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory(args: argparse.Namespace) -> None:
    """Child process: one variant at one rank, warm-up plus timed steps; prints its RSS figures as JSON."""
    model = build_base(args)
    gc.collect()
    reset_peak_rss()
    after_build = psutil.Process().memory_info().rss
    model = VARIANTS[args.measure](model, args.measure_rank, args.seed)
    step = make_step(model, make_batch(args), args.lr)
    for _ in range(WARMUP + args.steps):
        step()
    print(json.dumps({"rss_after_build": after_build, "peak_rss": peak_rss_bytes()}))


def child_memory(variant: str, rank: int, argv: list[str]) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.train", *argv, "--measure", variant, "--measure-rank", str(rank)],
        cwd=ROOT,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)},
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_interleaved(args: argparse.Namespace, rank: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per step of each variant (alternating order), and each variant's trainable-parameter count."""
    input_ids = make_batch(args)
    models = {name: make(build_base(args), rank, args.seed) for name, make in VARIANTS.items()}
    steps = {name: make_step(model, input_ids, args.lr) for name, model in models.items()}
    counts = {name: trainable_params(model) for name, model in models.items()}
    for _ in range(WARMUP):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(args.steps):
        for name in list(VARIANTS)[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times, counts


def rank_rows(rank: int, result: dict) -> tuple[list[list[object]], list[object]]:
    """One rank's rows: a row per variant (trainable parameters, step times, peak and working memory), and the
    LoRA-SB / PEFT LoRA ratios."""
    sb, lora = VARIANTS
    times, counts, memory = result["times"], result["counts"], result["memory"]
    median = {v: statistics.median(t) for v, t in times.items()}
    working = {v: m["peak_rss"] - m["rss_after_build"] for v, m in memory.items()}
    rows = [
        [
            rank,
            variant,
            f"{counts[variant]:,}",
            f"{median[variant] * 1e3:.0f}",
            f"{min(times[variant]) * 1e3:.0f}",
            f"{max(times[variant]) * 1e3:.0f}",
            f"{memory[variant]['peak_rss'] / MIB:.0f}",
            f"{working[variant] / MIB:.0f}",
        ]
        for variant in VARIANTS
    ]
    summary = [
        rank,
        f"{counts[lora] / counts[sb]:.1f}×",
        verdict(median[sb] / median[lora], TIME_TARGET),
        f"{min(times[sb]) / min(times[lora]):.3f}",
        verdict(working[sb] / working[lora], MEMORY_TARGET),
        f"{memory[sb]['peak_rss'] / memory[lora]['peak_rss']:.3f}",
    ]
    return rows, summary


def setup_facts(args: argparse.Namespace) -> dict[str, object]:
    """The setup table: machine, model, targets, batch, step, timing and memory method."""
    model = build_base(args)
    config = model.config
    targets = resolve_targets(model, "all-linear")
    return {
        **machine_info(),
        "model": (
            f"random LlamaForCausalLM float32: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"MLP {config.intermediate_size}, heads {config.num_attention_heads}/{config.num_key_value_heads} kv, "
            f"vocab {config.vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters"
        ),
        "targets": f"all-linear: {len(targets)} modules",
        "batch": f"{args.batch_size} × {args.seq_len} random tokens (input_ids {tuple(make_batch(args).shape)})",
        "step": f"causal-LM loss forward + backward + AdamW(lr={args.lr}).step() + zero_grad()",
        "timing": f"median of {args.steps} steps per variant after {WARMUP} warm-up steps, variants alternating",
        "memory": f"fresh subprocess per variant and rank, {WARMUP + args.steps} steps, "
        f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; working memory = peak RSS (VmHWM, mark reset after "
        "the base model was built) − RSS at that point",
    }


def report(args: argparse.Namespace, results: dict[int, dict]) -> str:
    rows, summary = [], []
    for rank, result in results.items():
        variant_rows, ratio_row = rank_rows(rank, result)
        rows += variant_rows
        summary.append(ratio_row)
    table = markdown_table(
        [
            "rank",
            "variant",
            "trainable params",
            "step time (ms, median)",
            "fastest (ms)",
            "slowest (ms)",
            "peak RSS (MiB)",
            "working memory (MiB)",
        ],
        rows,
    )
    ratios = markdown_table(
        [
            "rank",
            "trainable params LoRA / LoRA-SB",
            "step time LoRA-SB / LoRA (median)",
            "(fastest)",
            "working memory LoRA-SB / LoRA",
            "peak RSS LoRA-SB / LoRA",
        ],
        summary,
    )
    return (
        "# train: LoRA-SB vs PEFT LoRA, one training step\n\n"
        f"{table}\n\n{ratios}\n\n"
        "LoRA-SB = `lorasb_cli.adapter.inject` (random orthonormal B, A; R trained); PEFT LoRA = "
        "`peft.get_peft_model(LoraConfig(r, lora_alpha=r, lora_dropout=0))` (A, B trained); same targets, rank, "
        "model weights and batch.\n\n"
        f"{key_values(setup_facts(args))}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="8,32", help="comma list of ranks (default: 8,32)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test; writes no results file")
    parser.add_argument("--measure", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--measure-rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads, args.vocab = 2, 128, 344, 4, 2, 1024
        args.batch_size, args.seq_len, args.steps = 2, 64, 3
    if args.measure:
        measure_memory(args)
        return

    ranks = [int(r) for r in args.ranks.split(",")]
    sizes = ["--layers", args.layers, "--hidden", args.hidden, "--intermediate", args.intermediate]
    sizes += ["--heads", args.heads, "--kv-heads", args.kv_heads, "--vocab", args.vocab]
    sizes += ["--batch-size", args.batch_size, "--seq-len", args.seq_len, "--steps", args.steps]
    sizes += ["--lr", args.lr, "--seed", args.seed]
    results = {}
    for rank in ranks:
        memory = {variant: child_memory(variant, rank, [str(s) for s in sizes]) for variant in VARIANTS}
        times, counts = time_interleaved(args, rank)
        results[rank] = {"times": times, "counts": counts, "memory": memory}
        gc.collect()
    text = report(args, results)
    if not args.quick:
        print(f"wrote {write_result('train', text)}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
