"""The estimate, train and decompose benchmarks on the REAL bundled SmolLM2-135M (float32, CPU), in one run.

The other benchmarks use small random Llamas; this one loads `lorasb_cli.models.resolve_model("smollm2-135m")`
(SmolLM2-135M-Instruct: 30 layers, hidden 576, 210 all-linear targets) and real gsm-symbolic prompt-response rows.

Data: `builtin_data.load("gsm-symbolic", split="train")` rows, `data.encode(..., "prompt-response", 256)`
(prompt tokens carry no loss, response + EOS do), then PACKED: the encoded rows are concatenated (ids and labels
alike) into one stream, which is cut into samples of exactly `--seq-len` tokens. Every sample is therefore
`--seq-len` real tokens, with no padding (attention mask all ones, no document masking).

1. estimate vs plain: `lorasb_cli.estimate.sum_gradients` over the all-linear targets against a plain
   forward+backward with `requires_grad` on every weight (`benchmarks/common.py`'s `plain_pass`); both use
   `estimate.per_sample_loss_sum`. Targets: time ratio ≤ 1.10, peak RSS ratio ≤ 1.0.
2. train step: LoRA-SB (`lorasb_cli.adapter.inject` with random orthonormal B, A; only R trained) against PEFT
   LoRA (`get_peft_model(LoraConfig(r, lora_alpha=r, same targets, lora_dropout=0))`) at each rank of `--ranks`;
   a step is the model's causal-LM loss on the batch's labels, backward, AdamW step, zero_grad. Targets at equal
   rank: step time ratio ≤ 1.05, memory ratio ≤ 1.0. LoRA-SB at the highest rank is also set against PEFT LoRA at
   the lowest (trainable parameters, time, memory).
3. decompose: ΔW = −sign(G) of the real G from section 1's warm-up `sum_gradients` over the same samples;
   `lorasb_cli.linalg.truncated_svd` (its defaults) for all modules at `--decompose-rank`, seeded as
   `decompose` seeds it; captured energy Σσ_r²/‖ΔW‖² per module, and the exact SVD's optimum beside it.

Timing: all variants of a section live in the main process; after one untimed warm-up of each, they alternate
(the order rotates every round) for `--repeats` rounds, and the median is reported. Peak memory: each variant runs
in its own fresh subprocess with glibc's mmap threshold fixed at 64 KiB (as `benchmarks/train.py` does), which
resets the kernel's peak-RSS mark right after loading the model and building the batch, and reports the peak
(VmHWM) after one pass (estimate/plain) or two steps (train: the second step runs with AdamW's state allocated).

Other load on the machine pollutes the timings: unless `--wait-idle 0`, the run first waits (up to that many
minutes) until no other process uses more than 20 % of a core, and records the load average it started at.

    python -m benchmarks.real            # writes benchmarks/RESULTS.md (~5 min on 2 idle cores)
    python -m benchmarks.real --quick    # seq 64, 1 repetition, prints only
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch

from benchmarks.common import (
    ROOT,
    machine_info,
    markdown_table,
    max_relative_difference,
    plain_pass,
    verdict,
    write_section,
)
from benchmarks.train import MMAP_THRESHOLD, lorasb, peak_rss_bytes, peft_lora, reset_peak_rss, trainable_params
from lorasb_cli import builtin_data, data, models
from lorasb_cli.estimate import sum_gradients
from lorasb_cli.linalg import DEFAULT_NITER, oversampling, truncated_svd

MODEL = "smollm2-135m"
DATASET = "gsm-symbolic"
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
ESTIMATE_TIME_TARGET = 1.10
ESTIMATE_MEMORY_TARGET = 1.0
TRAIN_TIME_TARGET = 1.05
TRAIN_MEMORY_TARGET = 1.0
MIB = 2**20
TRAIN_VARIANTS = {"LoRA-SB": lorasb, "PEFT LoRA": peft_lora}
ESTIMATE_VARIANTS = ("estimate", "plain")


# ---------------------------------------------------------------------------------------------- model and data


def load(ref: models.ModelRef):
    return models.load_model(ref, dtype=torch.float32, device=torch.device("cpu"))


def packed_examples(tokenizer, args: argparse.Namespace) -> tuple[list[data.Example], int]:
    """`args.samples` examples of exactly `args.seq_len` tokens packed from consecutive encoded rows; also the
    number of rows used."""
    need = args.samples * args.seq_len
    size = 16
    while True:
        rows = builtin_data.load(DATASET, split="train", size=size, seed=args.seed).rows
        encoded = data.encode(rows, "prompt-response", tokenizer, args.max_length)
        if sum(len(e.input_ids) for e in encoded) >= need:
            break
        size *= 2
    ids: list[int] = []
    labels: list[int] = []
    used = 0
    for example in encoded:
        if len(ids) >= need:
            break
        ids += example.input_ids
        labels += example.labels
        used += 1
    examples = [
        data.Example(input_ids=ids[i : i + args.seq_len], labels=labels[i : i + args.seq_len])
        for i in range(0, need, args.seq_len)
    ]
    return examples, used


def make_batches(tokenizer, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    examples, _ = packed_examples(tokenizer, args)
    return list(data.make_batches(examples, args.batch_size, tokenizer.pad_token_id, sort_by_length=False))


def estimate_pass(model, batches):
    return sum_gradients(model, models.resolve_targets(model, "all-linear"), batches)


ESTIMATE_PASSES = {"estimate": estimate_pass, "plain": plain_pass}


def train_model(ref: models.ModelRef, variant: str, rank: int, seed: int):
    model, _ = load(ref)
    model.train()
    return TRAIN_VARIANTS[variant](model, rank, seed)


def make_step(model, batch: dict[str, torch.Tensor], lr: float):
    """One training step: causal-LM loss on the batch's labels, backward, AdamW step, zero_grad."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step() -> None:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# -------------------------------------------------------------------------------------------- memory children


def measure_memory(args: argparse.Namespace) -> None:
    """Child process: one variant, its RSS figures as JSON on the last stdout line."""
    ref = models.resolve_model(MODEL)
    if args.measure in ESTIMATE_VARIANTS:
        model, tokenizer = load(ref)
        batches = make_batches(tokenizer, args)
        gc.collect()
        reset_peak_rss()
        before = psutil.Process().memory_info().rss
        ESTIMATE_PASSES[args.measure](model, batches)
    else:
        variant, rank = args.measure.rsplit(":", 1)
        model, tokenizer = load(ref)
        model.train()
        batch = make_batches(tokenizer, args)[0]
        gc.collect()
        reset_peak_rss()
        before = psutil.Process().memory_info().rss
        model = TRAIN_VARIANTS[variant](model, int(rank), args.seed)
        step = make_step(model, batch, args.lr)
        for _ in range(2):
            step()
    print(json.dumps({"rss_before": before, "peak_rss": peak_rss_bytes()}))


def child_memory(measure: str, args: argparse.Namespace) -> dict[str, int]:
    argv = ["--samples", args.samples, "--batch-size", args.batch_size, "--seq-len", args.seq_len]
    argv += ["--max-length", args.max_length]
    argv += ["--seed", args.seed, "--lr", args.lr, "--measure", measure]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.real", *map(str, argv)],
        cwd=ROOT,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)},
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log(f"memory {measure}: peak {result['peak_rss'] / MIB:.0f} MiB ({time.perf_counter() - start:.0f} s)")
    return result


# ------------------------------------------------------------------------------------------------------ timing


def alternate(runs: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each run; one round calls each once, the order rotating by one each round (A B, B A,
    A B, ... for two), so each run takes each place in the order equally often."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            log(f"  {name}: {times[name][-1]:.2f} s")
    return times


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_until_idle(minutes: float) -> str:
    """Wait until no other process uses more than 20 % of a core (sampled over 5 s), at most `minutes`."""
    me = os.getpid()
    deadline = time.monotonic() + minutes * 60
    waited = 0.0
    while True:
        procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid != me]
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(5)
        busy = []
        for p in procs:
            try:
                percent = p.cpu_percent(None)
            except psutil.Error:
                continue
            if percent > 20:
                busy.append(f"{p.pid} {' '.join(p.info['cmdline'] or [p.info['name']])[:80]} ({percent:.0f} %)")
        if not busy:
            return f"no other busy process (waited {waited / 60:.1f} min)"
        if time.monotonic() >= deadline:
            return f"still busy after waiting {waited / 60:.1f} min: {'; '.join(busy)}"
        log(f"waiting for other load to end: {'; '.join(busy)}")
        time.sleep(25)
        waited += 30


# ----------------------------------------------------------------------------------------------------- sections


def bench_estimate(ref, args) -> dict:
    log("== 1. estimate vs plain")
    memory = {v: child_memory(v, args) for v in ESTIMATE_VARIANTS}
    model, tokenizer = load(ref)
    batches = make_batches(tokenizer, args)
    log("warm-up")
    plain_pass(model, batches)
    warm = estimate_pass(model, batches)
    difference = max_relative_difference(model, warm.sums)
    runs = {v: (lambda run=ESTIMATE_PASSES[v]: run(model, batches)) for v in ESTIMATE_VARIANTS}
    times = alternate(runs, args.repeats)
    model.zero_grad(set_to_none=True)
    return {
        "times": times,
        "memory": memory,
        "difference": difference,
        "sums": warm.sums,
        "samples": warm.samples,
        "tokens": warm.tokens,
    }


def bench_train(ref, args) -> dict:
    log("== 2. train steps")
    combos = [(variant, rank) for rank in args.ranks for variant in TRAIN_VARIANTS]
    memory = {c: child_memory(f"{c[0]}:{c[1]}", args) for c in combos}
    tokenizer = load(ref)[1]
    batch = make_batches(tokenizer, args)[0]
    steps, counts = {}, {}
    for variant, rank in combos:
        model = train_model(ref, variant, rank, args.seed)
        counts[(variant, rank)] = trainable_params(model)
        steps[(variant, rank)] = make_step(model, batch, args.lr)
    log("warm-up")
    for step in steps.values():
        step()
    named = {f"{v} r={r}": step for (v, r), step in steps.items()}
    times = alternate(named, args.repeats)
    times = {c: times[f"{c[0]} r={c[1]}"] for c in combos}
    del steps, named
    gc.collect()
    return {"times": times, "memory": memory, "counts": counts, "combos": combos}


def bench_decompose(sums: dict[str, torch.Tensor], args) -> dict:
    log("== 3. decompose")
    rank = args.decompose_rank
    updates = {name: torch.sign(g).neg_() for name, g in sums.items()}
    warm = torch.randn(256, 256)
    truncated_svd(warm, 8)
    truncated_svd(warm, 8, exact=True)
    totals, per_module, energy = [], {name: [] for name in updates}, {}
    for _ in range(args.repeats):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # as `decompose` seeds svd_lowrank
            start = time.perf_counter()
            for name, delta in updates.items():
                t0 = time.perf_counter()
                _, s, _ = truncated_svd(delta, rank)
                per_module[name].append(time.perf_counter() - t0)
                energy[name] = float((s.square().sum() / delta.square().sum()).clamp(max=1.0))
            totals.append(time.perf_counter() - start)
        log(f"  truncated_svd over {len(updates)} modules: {totals[-1]:.2f} s")
    optimum, excess, exact_total = {}, {}, 0.0
    for name, delta in updates.items():
        t0 = time.perf_counter()
        _, s_all, _ = truncated_svd(delta, min(delta.shape), exact=True)
        exact_total += time.perf_counter() - t0
        e = s_all.double().square()
        optimum[name] = float(e[:rank].sum() / e.sum())
        # ‖ΔW − B R A‖² = ‖ΔW‖² − Σσ_r² for the orthonormal factors: relative excess residual from energies.
        excess[name] = ((1 - energy[name]) / (1 - optimum[name])) ** 0.5 - 1
    log(f"  exact SVD over {len(updates)} modules: {exact_total:.2f} s")
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, delta in updates.items():
        shapes.setdefault(tuple(delta.shape), []).append(name)
    return {
        "totals": totals,
        "per_module": per_module,
        "energy": energy,
        "optimum": optimum,
        "excess": excess,
        "exact_total": exact_total,
        "shapes": shapes,
        "rank": rank,
    }


# ------------------------------------------------------------------------------------------------------ report


def fmt_range(times: list[float]) -> str:
    return f"{min(times):.2f} – {max(times):.2f}"


def report_estimate(r: dict, args) -> str:
    times, memory = r["times"], r["memory"]
    median = {v: statistics.median(t) for v, t in times.items()}
    working = {v: m["peak_rss"] - m["rss_before"] for v, m in memory.items()}
    rows = [
        [v, f"{median[v]:.2f}", fmt_range(times[v]), f"{memory[v]['peak_rss'] / MIB:.0f}", f"{working[v] / MIB:.0f}"]
        for v in ESTIMATE_VARIANTS
    ]
    rows.append(
        [
            "**estimate / plain**",
            verdict(median["estimate"] / median["plain"], ESTIMATE_TIME_TARGET),
            f"fastest: {min(times['estimate']) / min(times['plain']):.3f}",
            verdict(memory["estimate"]["peak_rss"] / memory["plain"]["peak_rss"], ESTIMATE_MEMORY_TARGET),
            f"{working['estimate'] / working['plain']:.3f}",
        ]
    )
    table = markdown_table(
        ["variant", "time per pass (s, median)", "range (s)", "peak RSS (MiB)", "peak − RSS before pass (MiB)"], rows
    )
    return (
        "## 1. estimate: hooked gradient sum vs plain forward+backward\n\n"
        f"{table}\n\n"
        f"One pass = {args.samples // args.batch_size} batch(es) of {args.batch_size} × {args.seq_len}: forward, "
        "`per_sample_loss_sum`, backward. estimate = `sum_gradients` over the 210 all-linear targets (hooks, no "
        "weight requires grad); plain = `requires_grad` on every weight (embeddings/tied LM head included), "
        "gradients left in `.grad`. "
        f"Both give the same G: max ‖G − autograd .grad‖ / ‖.grad‖ = {r['difference']:.1e}.\n"
    )


def train_table(r: dict) -> str:
    """A row per (variant, rank): trainable parameters, step time (median, range), peak and working memory."""
    times, memory, counts, combos = r["times"], r["memory"], r["counts"], r["combos"]
    median = {c: statistics.median(t) for c, t in times.items()}
    working = {c: m["peak_rss"] - m["rss_before"] for c, m in memory.items()}
    rows = [
        [
            rank,
            variant,
            f"{counts[(variant, rank)]:,}",
            f"{median[(variant, rank)]:.2f}",
            fmt_range(times[(variant, rank)]),
            f"{memory[(variant, rank)]['peak_rss'] / MIB:.0f}",
            f"{working[(variant, rank)] / MIB:.0f}",
        ]
        for variant, rank in combos
    ]
    return markdown_table(
        [
            "rank",
            "variant",
            "trainable params",
            "step (s, median)",
            "range (s)",
            "peak RSS (MiB)",
            "working memory (MiB)",
        ],
        rows,
    )


def train_ratio_row(r: dict, label: str, sb: tuple[str, int], lora: tuple[str, int], targets: bool) -> list[str]:
    """LoRA-SB `sb` against PEFT LoRA `lora` ((variant, rank) each); the ratios as verdicts when `targets`."""
    times, memory, counts = r["times"], r["memory"], r["counts"]
    working = {c: memory[c]["peak_rss"] - memory[c]["rss_before"] for c in (sb, lora)}
    time_ratio = statistics.median(times[sb]) / statistics.median(times[lora])
    work_ratio = working[sb] / working[lora]
    peak_ratio = memory[sb]["peak_rss"] / memory[lora]["peak_rss"]
    return [
        label,
        f"{counts[sb] / counts[lora]:.3f} ({counts[lora] / counts[sb]:.1f}× fewer)",
        verdict(time_ratio, TRAIN_TIME_TARGET) if targets else f"{time_ratio:.3f}",
        f"{min(times[sb]) / min(times[lora]):.3f}",
        verdict(work_ratio, TRAIN_MEMORY_TARGET) if targets else f"{work_ratio:.3f}",
        verdict(peak_ratio, TRAIN_MEMORY_TARGET) if targets else f"{peak_ratio:.3f}",
    ]


def report_train(r: dict, args) -> str:
    sb, lora = TRAIN_VARIANTS
    ratios = [train_ratio_row(r, f"r={rank} vs r={rank}", (sb, rank), (lora, rank), True) for rank in args.ranks]
    if len(args.ranks) > 1:
        hi, lo = max(args.ranks), min(args.ranks)
        ratios.append(train_ratio_row(r, f"LoRA-SB r={hi} vs PEFT LoRA r={lo}", (sb, hi), (lora, lo), False))
    ratio_table = markdown_table(
        ["LoRA-SB / PEFT LoRA", "trainable params", "step time (median)", "(fastest)", "working memory", "peak RSS"],
        ratios,
    )
    return (
        "## 2. train: LoRA-SB vs PEFT LoRA, one training step\n\n"
        f"{train_table(r)}\n\n{ratio_table}\n\n"
        f"Step = `model(input_ids, attention_mask, labels, use_cache=False).loss` on one batch of {args.batch_size} × "
        f"{args.seq_len} (labels: response tokens only), `.backward()`, `AdamW(lr={args.lr}).step()`, "
        "`zero_grad()`. LoRA-SB = `lorasb_cli.adapter.inject` (random orthonormal B, A, small random R; only R "
        "trained); PEFT LoRA = `get_peft_model(LoraConfig(r, lora_alpha=r, target_modules=<the 210 modules>, "
        "lora_dropout=0))` (A, B trained); same weights, targets and batch. All "
        f"{len(r['combos'])} variants are timed in one process, alternating. Working memory = peak RSS − RSS after "
        "loading the base model (adapter, activations, gradients, AdamW state).\n"
    )


def report_decompose(r: dict, args) -> str:
    rank = r["rank"]
    median_total = statistics.median(r["totals"])
    rows = []
    for shape, names in r["shapes"].items():
        per = [statistics.median(r["per_module"][n]) for n in names]
        energy = [r["energy"][n] for n in names]
        optimum = [r["optimum"][n] for n in names]
        excess = [r["excess"][n] for n in names]
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
        rows.append(
            [
                f"{shape[0]}×{shape[1]}",
                f"{len(names)} ({', '.join(suffixes)})",
                f"{1e3 * statistics.mean(per):.1f}",
                f"{sum(per):.2f}",
                f"{statistics.mean(energy):.4f}",
                f"{statistics.mean(optimum):.4f}",
                f"{100 * max(excess):.3f} %",
            ]
        )
    all_energy = list(r["energy"].values())
    rows.append(
        [
            "**all**",
            str(len(all_energy)),
            f"{1e3 * median_total / len(all_energy):.1f}",
            f"**{median_total:.2f}** (range {fmt_range(r['totals'])})",
            f"**{statistics.mean(all_energy):.4f}** (min {min(all_energy):.4f})",
            f"{statistics.mean(r['optimum'].values()):.4f}",
            f"{100 * max(r['excess'].values()):.3f} %",
        ]
    )
    table = markdown_table(
        [
            "shape",
            "modules",
            "truncated_svd per module (ms)",
            "total (s)",
            "captured energy (mean)",
            "exact top-r energy (mean)",
            "max excess residual",
        ],
        rows,
    )
    return (
        f"## 3. decompose: rank {rank}, all {len(all_energy)} modules\n\n"
        f"{table}\n\n"
        f"ΔW = −sign(G), G the real gradient sum of section 1 (`sum_gradients`, {r['samples']} samples, "
        f"{r['tokens']:,} supervised tokens). Time = `truncated_svd(ΔW, {rank})` with decompose's defaults "
        f"(`torch.svd_lowrank`, niter {DEFAULT_NITER}, q = r + {oversampling(rank)}), seeded as `decompose` seeds "
        f"it, median of {len(r['totals'])} passes over all modules (conversion and I/O excluded). Captured energy "
        "= Σ_{i≤r} σ_i² / ‖ΔW‖_F² of the randomized factors; exact top-r energy = the same from "
        f"`torch.linalg.svd` (Eckart–Young optimum; {r['exact_total']:.1f} s for all modules); excess residual = "
        "‖ΔW − B·R·A‖_F / ‖ΔW − trunc_r(ΔW)‖_F − 1 (target < 1 %).\n"
    )


def report(args, setup: dict, est: dict, tr: dict, dec: dict) -> str:
    setup_table = markdown_table(["", ""], [[k, v] for k, v in setup.items()])
    return (
        "# Real-model benchmarks: SmolLM2-135M, float32, CPU\n\n"
        f"Measured on: {setup['measured on']}.\n\n"
        f"{report_estimate(est, args)}\n{report_train(tr, args)}\n{report_decompose(dec, args)}\n"
        f"## Setup\n\n{setup_table}\n"
    )


# -------------------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8, help="samples per estimate pass (default: one batch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=256, help="data.encode max_length of each row")
    parser.add_argument("--ranks", default="8,32", help="comma list of train ranks (default: 8,32)")
    parser.add_argument("--decompose-rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per variant (after 1 warm-up)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-idle", type=float, default=20, help="minutes to wait for other load to end")
    parser.add_argument("--quick", action="store_true", help="seq 64, 1 repetition, no waiting; writes no file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    return parser.parse_args()


def model_and_rows(ref: models.ModelRef, args: argparse.Namespace) -> tuple[str, int]:
    """The setup table's description of the model (layers, sizes, parameters, targets), and how many dataset rows
    the packed samples use."""
    model, tokenizer = load(ref)
    targets = models.resolve_targets(model, "all-linear")
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    target_params = sum(dict(model.named_modules())[n].weight.numel() for n in targets)
    _, rows_used = packed_examples(tokenizer, args)
    model_text = (
        f"{type(config).__name__.removesuffix('Config')} {config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, MLP {config.intermediate_size}, heads {config.num_attention_heads}/"
        f"{config.num_key_value_heads} kv, vocab {config.vocab_size}, tied embeddings "
        f"{config.tie_word_embeddings}; {n_params / 1e6:.1f} M parameters ({len(targets)} all-linear targets: "
        f"{target_params / 1e6:.1f} M)"
    )
    del model
    gc.collect()
    return model_text, rows_used


def setup_facts(
    ref: models.ModelRef,
    args: argparse.Namespace,
    model_text: str,
    rows_used: int,
    idle: str,
    load_start: float,
    minutes: float,
) -> dict[str, str]:
    """The setup table (the load average at its end read now)."""
    source = ref.source or {}
    return {
        "measured on": (
            f"real {MODEL} ({source.get('file', ref.path)} from {source.get('package')}=={source.get('version')}, "
            f"dequantized to float32), float32 on CPU, {os.cpu_count()} cores, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {datetime.date.today().isoformat()}"
            + (" — QUICK smoke run, not representative" if args.quick else "")
        ),
        **machine_info(),
        "BLAS / CPU capability": f"{'MKL' if torch.backends.mkl.is_available() else 'other'} / "
        f"{torch.backends.cpu.get_cpu_capability()}",
        "model": model_text,
        "data": (
            f"{args.samples} samples × {args.seq_len} tokens packed from {rows_used} real `{DATASET}` train rows "
            f"(seed {args.seed}; `data.encode` prompt-response, max_length {args.max_length}; consecutive encoded "
            "rows concatenated into one stream, cut into samples of exactly the sequence length; loss on response "
            "tokens only; no padding)"
        ),
        "batch": f"{args.batch_size} × {args.seq_len}",
        "timing": f"1 warm-up + {args.repeats} timed repetitions per variant, alternating, median",
        "memory": f"fresh subprocess per variant, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}, peak = VmHWM with the "
        "mark reset after loading the model",
        "1-min load average at start": f"{load_start:.2f} ({idle})",
        "1-min load average at end": f"{os.getloadavg()[0]:.2f}",
        "whole run": f"{minutes:.1f} min",
    }


def main() -> None:
    args = parse_args()
    if args.measure:
        measure_memory(args)
        return
    if args.quick:
        args.seq_len, args.repeats, args.wait_idle = 64, 1, 0
    args.ranks = [int(r) for r in str(args.ranks).split(",")]

    idle = wait_until_idle(args.wait_idle) if args.wait_idle > 0 else "not checked (--wait-idle 0)"
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    log(f"start: load average {load_start:.2f}; {idle}")
    ref = models.resolve_model(MODEL)
    model_text, rows_used = model_and_rows(ref, args)

    est = bench_estimate(ref, args)
    dec = bench_decompose(est.pop("sums"), args)
    dec |= {"samples": est["samples"], "tokens": est["tokens"]}
    gc.collect()
    tr = bench_train(ref, args)
    minutes = (time.perf_counter() - started) / 60

    setup = setup_facts(ref, args, model_text, rows_used, idle, load_start, minutes)
    text = report(args, setup, est, tr, dec)
    if not args.quick:
        write_section(RESULTS_PATH, "speed", text)
        log(f"wrote {RESULTS_PATH}")
    print(text)


if __name__ == "__main__":
    main()
