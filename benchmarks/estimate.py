"""Speed and memory of `lorasb estimate`'s gradient sum against a plain forward+backward (DESIGN.md §4).

On a randomly initialized Llama (float32, CPU) and synthetic token batches, the same per-sample loss
(`estimate.per_sample_loss_sum`) over the same batches is run two ways:

- estimate: `lorasb_cli.estimate.sum_gradients` over all-linear targets (hooks, no weight requires grad);
- plain:    `requires_grad=True` on every weight, `loss.backward()` per batch, gradients left in `.grad`.

Wall time: after one untimed pass of each (the warm-up, which also checks that both give the same G),
the two alternate for `--repeats` rounds, so other load on the machine hits both alike; the median
per full pass is reported, and the ratio of the fastest passes beside it. Peak RSS: each variant runs
once in its own fresh subprocess (ru_maxrss only grows), which reports its RSS before the pass and
its peak after (psutil, from the `test` extra, reads the former).
Targets: estimate time / plain time ≤ 1.10, estimate peak RSS / plain peak RSS ≤ 1.0.

    python benchmarks/estimate.py            # writes benchmarks/results/estimate.md
    python benchmarks/estimate.py --quick    # small smoke run, prints only
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch
from common import key_values, machine_info, markdown_table, verdict, write_result
from transformers import LlamaConfig, LlamaForCausalLM

from lorasb_cli import data
from lorasb_cli.estimate import per_sample_loss_sum, sum_gradients
from lorasb_cli.models import resolve_targets

TIME_TARGET = 1.10
RSS_TARGET = 1.0
MIB = 2**20


def build(args: argparse.Namespace) -> tuple[LlamaForCausalLM, list[dict[str, torch.Tensor]]]:
    """The seeded random model and the synthetic batches (every token supervised, no padding)."""
    torch.manual_seed(args.seed)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or args.hidden * 11008 // 4096,  # Llama's MLP ratio
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=args.vocab,
        max_position_embeddings=args.seq_len,
    )
    model = LlamaForCausalLM(config).float().eval()
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len)).tolist()
    examples = [data.Example(input_ids=row, labels=row) for row in ids]
    return model, list(data.make_batches(examples, args.batch_size, pad_id=0))


def plain_pass(model: LlamaForCausalLM, batches: list[dict[str, torch.Tensor]]) -> None:
    """Forward+backward with every weight requiring grad; gradients accumulate in `.grad`."""
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = per_sample_loss_sum(logits, batch["labels"])
        del logits
        loss.backward()


def estimate_pass(model: LlamaForCausalLM, batches: list[dict[str, torch.Tensor]]):
    return sum_gradients(model, resolve_targets(model, "all-linear"), batches)


PASSES = {"estimate": estimate_pass, "plain": plain_pass}


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def measure_memory(args: argparse.Namespace) -> None:
    """Child process: one full pass of one variant; prints its RSS before the pass and its peak as JSON."""
    model, batches = build(args)
    gc.collect()
    before = psutil.Process().memory_info().rss
    PASSES[args.measure](model, batches)
    print(json.dumps({"rss_before": before, "peak_rss": peak_rss_bytes()}))


def child_memory(variant: str, argv: list[str]) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, __file__, *argv, "--measure", variant], check=True, capture_output=True, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_relative_difference(model: LlamaForCausalLM, sums: dict[str, torch.Tensor]) -> float:
    """Largest ‖G − .grad‖ / ‖.grad‖ over target modules: both variants must compute the same gradient."""
    named = dict(model.named_modules())
    return max(float((g - named[n].weight.grad).norm() / named[n].weight.grad.norm()) for n, g in sums.items())


def time_both(model: LlamaForCausalLM, batches: list[dict[str, torch.Tensor]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds per full pass of each variant, the two alternating for `repeats` rounds."""
    times: dict[str, list[float]] = {"estimate": [], "plain": []}
    for _ in range(repeats):
        for variant, run in PASSES.items():
            start = time.perf_counter()
            run(model, batches)
            times[variant].append(time.perf_counter() - start)
    return times


def report(args: argparse.Namespace, model: LlamaForCausalLM, batches, times, memory, difference: float) -> str:
    config = model.config
    targets = resolve_targets(model, "all-linear")
    target_params = sum(dict(model.named_modules())[n].weight.numel() for n in targets)
    setup = {
        **machine_info(),
        "model": (
            f"random LlamaForCausalLM float32: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
            f"MLP {config.intermediate_size}, heads {config.num_attention_heads}/{config.num_key_value_heads} kv, "
            f"vocab {config.vocab_size}"
        ),
        "parameters": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
        f"({len(targets)} all-linear targets: {target_params / 1e6:.2f} M)",
        "data": f"{args.samples} samples × {args.seq_len} tokens, batch size {args.batch_size} "
        f"({len(batches)} batches of {tuple(batches[0]['input_ids'].shape)})",
        "timing": f"median of {args.repeats} alternating full passes after an untimed one of each",
        "max ‖G − autograd .grad‖ / ‖.grad‖": f"{difference:.1e}",
    }
    median = {v: statistics.median(t) for v, t in times.items()}
    working = {v: m["peak_rss"] - m["rss_before"] for v, m in memory.items()}
    rows = [
        [
            variant,
            f"{median[variant]:.3f}",
            f"{min(times[variant]):.3f} – {max(times[variant]):.3f}",
            f"{memory[variant]['peak_rss'] / MIB:.0f}",
            f"{working[variant] / MIB:.0f}",
        ]
        for variant in PASSES
    ]
    time_ratio = median["estimate"] / median["plain"]
    rss_ratio = memory["estimate"]["peak_rss"] / memory["plain"]["peak_rss"]
    rows.append(
        [
            "**estimate / plain**",
            verdict(time_ratio, TIME_TARGET),
            f"fastest: {min(times['estimate']) / min(times['plain']):.3f}",
            verdict(rss_ratio, RSS_TARGET),
            f"{working['estimate'] / working['plain']:.3f}",
        ]
    )
    table = markdown_table(
        ["variant", "time per pass (s, median)", "range (s)", "peak RSS (MiB)", "peak − RSS before pass (MiB)"], rows
    )
    return (
        "# estimate: hooked gradient sum vs plain forward+backward\n\n"
        f"{table}\n\n"
        "estimate = `lorasb_cli.estimate.sum_gradients` (all-linear targets); plain = every weight "
        "`requires_grad`, `.backward()` per batch, gradients in `.grad`; same per-sample loss. "
        "Peak RSS from one pass in a fresh subprocess per variant.\n\n"
        f"{key_values(setup)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: Llama's 11008/4096 ratio)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test; writes no results file")
    parser.add_argument("--measure", choices=list(PASSES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.vocab = 2, 128, 1024
        args.samples, args.batch_size, args.seq_len, args.repeats = 8, 4, 64, 2
    if args.measure:
        measure_memory(args)
        return

    sizes = ["--layers", args.layers, "--hidden", args.hidden, "--vocab", args.vocab, "--samples", args.samples]
    sizes += ["--batch-size", args.batch_size, "--seq-len", args.seq_len, "--seed", args.seed]
    if args.intermediate:
        sizes += ["--intermediate", args.intermediate]
    memory = {variant: child_memory(variant, [str(s) for s in sizes]) for variant in PASSES}

    model, batches = build(args)
    plain_pass(model, batches)  # untimed warm-up passes, and a check that both compute the same G
    difference = max_relative_difference(model, estimate_pass(model, batches).sums)
    times = time_both(model, batches, args.repeats)
    text = report(args, model, batches, times, memory, difference)
    if not args.quick:
        print(f"wrote {write_result('estimate', text)}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
