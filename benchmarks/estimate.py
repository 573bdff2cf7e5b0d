"""estimate's time and memory against its peers, and the memory plan against what was measured (docs/design.md §4).

Model: the bundled SmolLM2-135M (`--model smollm2-135m`, the default: float32 on CPU, benchmarks/real.py's
batches — real gsm-symbolic rows packed into samples of exactly `--seq-len` tokens, loss on the response tokens)
or `--model random` (a random Llama of `--layers`, `--hidden`, `--vocab`; random tokens, all supervised).
`--samples` samples (default one batch of `--batch-size` × `--seq-len`), all-linear targets. Variants:

- estimate:    `lorasb_cli.estimate.sum_gradients` — hooks, no weight requires grad, per-sample loss;
- loraga:      PEFT's LoRA-GA `preprocess_loraga` (peft.tuners.lora.loraga), the peer that sums the same
               gradients, with `train_step` = `model(**batch).loss.backward()` per batch as `lorasb train
               --method loraga` calls it: requires_grad on the target weights only, gradients in `.grad`;
- plain:       `requires_grad` on every weight, `per_sample_loss_sum(...).backward()`, gradients in `.grad`;
- lorasb-step: a LoRA-SB training step at `--rank` on the first batch (benchmarks/train.py's `lorasb`: random
               orthonormal B, A; only R trained): HF causal-LM loss, backward, AdamW step, zero_grad; two steps,
               the second with AdamW's state allocated (time: the second).

Every figure comes from fresh subprocesses, one variant each: load the model and the batches, record RSS,
reset the kernel's peak-RSS mark, run one pass (timed), report the peak (VmHWM). glibc's mmap threshold is fixed
at 64 KiB (as in benchmarks/train.py) so RSS follows the live tensors. `--rounds` rounds, the order rotating
each round (A B C D, B C D A, ...), so load from other processes hits all variants alike; medians are reported.
Working memory = peak RSS − RSS after loading (activations, gradients, accumulators, optimizer state).

Targets: estimate peak RSS / LoRA-SB step peak RSS ≤ 1.00 (the §4 contract); estimate / loraga median time and
working memory ≤ 1.00. The plan section sets `lorasb_cli.plan` (meta device, no weights) against peak RSS − RSS
before the model was loaded: estimate over the batches twice (every accumulator allocated in the second pass),
the LoRA-SB step, and `merge.merge` of a rank-`--rank` factors file made by estimate + decompose. A last
section gives the plans of Mistral-7B and Llama-3.2-3B from their real config values (nothing downloaded).

    python -m benchmarks.estimate              # results/estimate.md and the estimate + plan sections of RESULTS.md
    python -m benchmarks.estimate --quick      # seq 64, 1 round, prints only
    python -m benchmarks.estimate --plan-only  # just the Mistral-7B / Llama-3.2-3B plans (seconds; RESULTS.md)
    python -m benchmarks.estimate --model random --layers 4 --hidden 512 --samples 32   # the old random Llama
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
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import (
    MISTRAL_7B_SHAPE,
    ROOT,
    key_values,
    machine_info,
    markdown_table,
    max_relative_difference,
    plain_pass,
    verdict,
    write_result,
    write_section,
)
from lorasb_cli import data, models, plan
from lorasb_cli.estimate import sum_gradients
from lorasb_cli.models import resolve_targets

CONTRACT_TARGET = 1.00  # estimate peak / LoRA-SB step peak (docs/design.md §4)
PEER_TARGET = 1.00  # estimate / PEFT preprocess_loraga, time and working memory
MIB = 2**20
GIB = 2**30
MMAP_THRESHOLD = 64 * 1024
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
VARIANTS = ("estimate", "loraga", "plain", "lorasb-step")

# The real config values that fix the memory of the paper's models (their config.json on the hub).
PAPER_MODELS = {
    "Mistral-7B-v0.1": (
        "MistralConfig",
        {
            **MISTRAL_7B_SHAPE,
            "max_position_embeddings": 32768,
            "sliding_window": 4096,
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5,
        },
    ),
    "Llama-3.2-3B": (
        "LlamaConfig",
        {
            "hidden_size": 3072,
            "intermediate_size": 8192,
            "num_hidden_layers": 28,
            "num_attention_heads": 24,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5,
        },
    ),
}


def random_config(args: argparse.Namespace) -> LlamaConfig:
    heads = max(1, args.hidden // 64)
    return LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or args.hidden * 11008 // 4096,  # Llama's MLP ratio
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=args.vocab,
        max_position_embeddings=args.seq_len,
    )


def build(args: argparse.Namespace) -> tuple[LlamaForCausalLM, list[dict[str, torch.Tensor]]]:
    """The model (float32, CPU) and the batches: SmolLM2 with real packed rows, or the seeded random Llama with
    synthetic tokens (every token supervised, no padding)."""
    if args.model != "random":
        from benchmarks.real import load, make_batches

        model, tokenizer = load(models.resolve_model(args.model))
        return model, make_batches(tokenizer, args)
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(random_config(args)).float().eval()
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len)).tolist()
    examples = [data.Example(input_ids=row, labels=row) for row in ids]
    return model, list(data.make_batches(examples, args.batch_size, pad_id=0))


def estimate_pass(model: LlamaForCausalLM, batches: list[dict[str, torch.Tensor]]):
    return sum_gradients(model, resolve_targets(model, "all-linear"), batches)


def loraga_pass(model: LlamaForCausalLM, batches: list[dict[str, torch.Tensor]]) -> None:
    """PEFT's LoRA-GA gradient estimation over the batches, called as lorasb_cli/methods/peft_lora.py calls it."""
    from peft import LoraConfig
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    config = LoraConfig(
        r=32,
        target_modules=resolve_targets(model, "all-linear"),
        init_lora_weights="lora_ga",
        lora_ga_config=LoraGAConfig(),
    )

    def train_step() -> None:
        for batch in batches:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)


def peak_rss_bytes() -> int:
    """This address space's peak RSS (VmHWM), which `reset_peak_rss` lowers (unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024  # KiB


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(args: argparse.Namespace) -> None:
    """Child process: load, then one pass of `args.measure`; prints its RSS figures, wall and CPU seconds."""
    if args.threads:
        torch.set_num_threads(args.threads)
    start_rss = psutil.Process().memory_info().rss  # interpreter and libraries, no model yet
    if args.measure == "merge":
        from lorasb_cli import merge

        def run() -> None:
            with tempfile.TemporaryDirectory() as out:
                merge.merge(merge.MergeConfig(adapter=args.factors, out=str(Path(out) / "merged"), model=args.model))

        loaded_rss = start_rss
    else:
        model, batches = build(args)
        if args.measure == "lorasb-step":
            from benchmarks.real import make_step
            from benchmarks.train import lorasb

            model.train()
            step = make_step(lorasb(model, args.rank, args.seed), batches[0], lr=1e-4)

            def run() -> None:
                for _ in range(2):
                    step()

        else:
            passes = {
                "estimate": estimate_pass,
                "estimate-twice": estimate_pass,
                "loraga": loraga_pass,
                "plain": plain_pass,
            }
            chosen = batches + batches if args.measure == "estimate-twice" else batches

            def run() -> None:
                passes[args.measure](model, chosen)

        gc.collect()
        loaded_rss = psutil.Process().memory_info().rss
    reset_peak_rss()
    start, cpu = time.perf_counter(), time.process_time()
    run()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    print(
        json.dumps(
            {
                "start_rss": start_rss,
                "loaded_rss": loaded_rss,
                "peak_rss": peak_rss_bytes(),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
            }
        )
    )


def child(variant: str, args: argparse.Namespace, extra: list[str] = ()) -> dict:
    """One fresh subprocess measuring `variant` (see the module doc)."""
    argv = ["--model", args.model, "--layers", args.layers, "--hidden", args.hidden, "--vocab", args.vocab]
    argv += ["--samples", args.samples, "--batch-size", args.batch_size, "--seq-len", args.seq_len]
    argv += ["--max-length", args.max_length, "--rank", args.rank, "--seed", args.seed, "--measure", variant]
    argv += ["--intermediate", args.intermediate] if args.intermediate else []
    argv += ["--threads", args.threads] if args.threads else []
    for attempt in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.estimate", *map(str, argv), *extra],
            cwd=ROOT,
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)},
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode >= 0 or attempt == 1:
            break
        log(f"  {variant}: killed by signal {-done.returncode}; once more")  # from outside, not a failure of its own
    if done.returncode != 0:
        raise RuntimeError(f"child {variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log(
        f"  {variant}: {result['seconds']:.2f} s ({result['cpu_seconds']:.2f} CPU s), peak "
        f"{result['peak_rss'] / MIB:.0f} MiB"
    )
    return result


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rounds(args: argparse.Namespace) -> dict[str, list[dict]]:
    """`args.rounds` rounds of fresh-process runs of every variant, the order rotating by one each round."""
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for i in range(args.rounds):
        log(f"round {i + 1}/{args.rounds}")
        for variant in VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]:
            runs[variant].append(child(variant, args))
    return runs


def medians(runs: list[dict]) -> dict[str, float]:
    """Median seconds, peak RSS and working memory (peak − RSS after loading) of one variant's runs."""
    return {
        "seconds": statistics.median(r["seconds"] for r in runs),
        "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
        "peak": statistics.median(r["peak_rss"] for r in runs),
        "working": statistics.median(r["peak_rss"] - r["loaded_rss"] for r in runs),
        "above_start": statistics.median(r["peak_rss"] - r["start_rss"] for r in runs),
    }


def report_peers(args: argparse.Namespace, runs: dict[str, list[dict]], difference: float) -> str:
    m = {v: medians(r) for v, r in runs.items()}
    rows = [
        [
            variant,
            f"{m[variant]['seconds']:.2f}",
            f"{min(r['seconds'] for r in runs[variant]):.2f} – {max(r['seconds'] for r in runs[variant]):.2f}",
            f"{m[variant]['cpu_seconds']:.2f}",
            f"{m[variant]['peak'] / MIB:.0f}",
            f"{m[variant]['working'] / MIB:.0f}",
        ]
        for variant in VARIANTS
    ]
    table = markdown_table(
        ["variant", "seconds (median)", "range", "CPU seconds (median)", "peak RSS (MiB)", "working memory (MiB)"], rows
    )

    def ratio(other: str, key: str, target: float | None = None) -> str:
        value = m["estimate"][key] / m[other][key]
        return verdict(value, target) if target is not None else f"{value:.3f}"

    step = f"LoRA-SB r={args.rank} training step"
    ratios = markdown_table(
        ["estimate / …", "time (median)", "CPU time (median)", "peak RSS", "working memory"],
        [
            [
                step,
                "(two steps: not compared)",
                "",
                ratio("lorasb-step", "peak", CONTRACT_TARGET),
                ratio("lorasb-step", "working"),
            ],
            [
                "PEFT LoRA-GA preprocess_loraga",
                ratio("loraga", "seconds", PEER_TARGET),
                ratio("loraga", "cpu_seconds", PEER_TARGET),
                ratio("loraga", "peak"),
                ratio("loraga", "working", PEER_TARGET),
            ],
            [
                "plain autograd",
                ratio("plain", "seconds"),
                ratio("plain", "cpu_seconds"),
                ratio("plain", "peak"),
                ratio("plain", "working"),
            ],
        ],
    )
    threads = args.threads or torch.get_num_threads()
    return (
        f"## estimate against its peers: {describe_model(args)}\n\n{table}\n\n{ratios}\n\n"
        f"{len(runs['estimate'])} rounds of fresh-process runs, one variant each, the order rotating; one pass of "
        f"{args.samples} samples × {args.seq_len} tokens (batch {args.batch_size}), torch with {threads} thread(s). "
        "CPU seconds = the process's user + system time over the pass (less disturbed than wall time by other "
        "load on the machine). lorasb-step's figures are its two steps (the first allocates AdamW's state). "
        "Working memory = peak RSS − RSS after loading the model and the batches. estimate's G equals "
        f"autograd's `.grad` (max ‖G − .grad‖ / ‖.grad‖ = {difference:.1e}); loraga sums the gradients of HF's "
        "batch-mean loss, estimate those of the per-sample loss (docs/design.md §3): the same work, the tokens "
        "weighted differently.\n"
    )


def describe_model(args: argparse.Namespace) -> str:
    if args.model == "random":
        c = random_config(args)
        return (
            f"random Llama, {c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size}, "
            f"vocab {c.vocab_size}, float32, CPU"
        )
    return f"{args.model}, float32, CPU"


def plan_ref(args: argparse.Namespace, folder: Path) -> models.ModelRef:
    """The model to plan: the bundled model, or the random Llama's config alone in `folder`."""
    if args.model != "random":
        return models.resolve_model(args.model)
    random_config(args).save_pretrained(folder)
    return models.resolve_model(str(folder))


def make_factors(args: argparse.Namespace, folder: Path) -> Path:
    """A rank-`args.rank` factors file for the model, through the real stages (estimate on 8 rows, decompose)."""
    from lorasb_cli import builtin_data, decompose, estimate

    rows = builtin_data.load("gsm-symbolic", split="train", size=8, seed=args.seed).rows
    rows_file = folder / "rows.jsonl"
    rows_file.write_text(builtin_data.to_jsonl(rows))
    update = folder / "update.safetensors"
    estimate.estimate(
        estimate.EstimateConfig(
            model=args.model,
            data=str(rows_file),
            out=str(update),
            samples=8,
            max_length=args.max_length,
            dtype="float32",
        )
    )
    factors = folder / "factors.safetensors"
    decompose.decompose(decompose.DecomposeConfig.from_options(update=str(update), rank=args.rank, out=str(factors)))
    return factors


def report_plan(args: argparse.Namespace, facts: plan.ModelFacts, measured: dict[str, dict]) -> str:
    """The plan's figures beside the measured peaks (peak RSS − RSS before the model was loaded)."""
    stages = plan.plan_stages(facts).stages
    rows = []
    for stage, variant, what in (
        ("estimate", "estimate-twice", "estimate, the batches twice"),
        ("train", "lorasb-step", f"LoRA-SB r={args.rank} step"),
        ("merge", "merge", f"merge of a rank-{args.rank} adapter"),
    ):
        if variant not in measured:
            continue
        got = measured[variant]["peak_rss"] - measured[variant]["start_rss"]
        items = ", ".join(f"{i.what.split(' (')[0]} {i.bytes / MIB:.0f}" for i in stages[stage].items)
        rows.append(
            [what, f"{stages[stage].total / MIB:.0f}", f"{got / MIB:.0f}", f"{stages[stage].total / got:.3f}", items]
        )
    table = markdown_table(["stage", "plan (MiB)", "measured (MiB)", "plan / measured", "plan's items (MiB)"], rows)
    return (
        f"## the memory plan against measured peaks: {describe_model(args)}, batch {args.batch_size} × "
        f"{args.seq_len}\n\n{table}\n\n"
        "plan = `lorasb_cli.plan` (`lorasb estimate --dry-run`: meta device, no weights read); measured = peak RSS "
        "(VmHWM) − RSS of the fresh process before it loaded the model (interpreter and libraries), so the "
        "measured figure also holds the allocator's slack and whatever loading left behind. estimate runs its "
        "batches twice so that every accumulator exists while the second pass's activations do.\n"
    )


def report_paper_models(rows_per_model: dict[str, tuple[plan.ModelFacts, dict]], batch: int, length: int) -> str:
    header = ["model", "stage", "needs (GiB)", "on", "what (GiB)"]
    rows = []
    for name, (facts, plans) in rows_per_model.items():
        for label, stage in plans.items():
            need = ", ".join(f"{b / GIB:.1f} on {where}" for where, b in stage.need().items())
            items = "; ".join(f"{i.what} {i.bytes / GIB:.2f}" for i in stage.items)
            rows.append([name, label, f"**{stage.total / GIB:.1f}**", need, items])
    facts_rows = [
        [
            name,
            f"{facts.parameters / 1e9:.2f} B",
            f"{facts.weight_bytes / GIB:.2f}",
            len(facts.targets),
            f"{facts.target_entries / 1e9:.3f} B",
            f"{plan.accumulator_bytes(facts.targets) / GIB:.2f}",
        ]
        for name, (facts, _) in rows_per_model.items()
    ]
    facts_header = ["model", "parameters", "bf16 weights (GiB)", "targets", "Σ m·n", "float32 accumulators (GiB)"]
    return (
        f"## the plan for the paper's models (bfloat16, batch {batch} × {length}, all-linear targets)\n\n"
        + markdown_table(facts_header, facts_rows)
        + "\n\n"
        + markdown_table(header, rows)
        + "\n\n"
        "From `lorasb_cli.plan.model_facts` on a folder holding only a config.json built from the real config "
        "values (transformers' MistralConfig / LlamaConfig: hidden, layers, heads, KV heads, MLP width, vocab, "
        'tied embeddings; nothing downloaded, no weights), on the meta device; "cuda:0" names the accelerator '
        "(no GPU is needed to plan). merge assumes the whole checkpoint is one shard (the layout of a hub "
        "checkpoint is not in its config): an upper bound for checkpoints split into smaller shards. "
        "`lorasb estimate --model DIR --dry-run --dtype bfloat16 --device cuda ...` prints the same plans.\n"
    )


def paper_model_plans(batch: int, length: int, folder: Path) -> dict[str, tuple[plan.ModelFacts, dict]]:
    import transformers

    out = {}
    for name, (config_class, values) in PAPER_MODELS.items():
        directory = folder / name
        getattr(transformers, config_class)(**values).save_pretrained(directory)
        ref = models.ModelRef(id=f"{name} (config values)", path=str(directory))
        by_rank = {
            r: plan.model_facts(ref, batch_size=batch, max_length=length, rank=r, dtype=torch.bfloat16)
            for r in (32, 96)
        }
        facts = by_rank[96]
        device = "cuda:0"
        out[name] = (
            facts,
            {
                "estimate, float32 accumulators on cpu": plan.estimate_plan(facts, device=device, accumulate_on="cpu"),
                "estimate, float32 accumulators on device": plan.estimate_plan(
                    facts, device=device, accumulate_on="device"
                ),
                "estimate, bfloat16 accumulators on device": plan.estimate_plan(
                    facts, device=device, accumulate_on="device", accumulate_dtype=torch.bfloat16
                ),
                "train, LoRA-SB r=32": plan.train_plan(by_rank[32], device=device),
                "train, LoRA-SB r=96": plan.train_plan(facts, device=device),
                "merge (r=96)": plan.merge_plan(facts),
            },
        )
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="a bundled model alias, or random")
    parser.add_argument("--layers", type=int, default=4, help="--model random: its sizes")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP width (default: Llama's 11008/4096 ratio)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=None, help="samples per pass (default: one batch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=256, help="data.encode max_length of each real row")
    parser.add_argument("--rank", type=int, default=32, help="LoRA-SB rank of the training step and the merge")
    parser.add_argument("--rounds", type=int, default=3, help="fresh-process rounds of every variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan-batch", default="8x512", help="batch × length of the paper-model plans")
    parser.add_argument("--quick", action="store_true", help="seq 64, 1 round; prints only, writes no file")
    parser.add_argument("--plan-only", action="store_true", help="only the paper-model plans (RESULTS.md section)")
    parser.add_argument(
        "--peers-only",
        action="store_true",
        help="only the peers table, printed (e.g. PYTHONPATH=<older checkout> for a before figure)",
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--factors", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.samples = args.samples or args.batch_size
    if args.quick:
        args.seq_len, args.max_length, args.rounds = 64, 64, 1
    return args


def paper_section(batch: int, length: int) -> str:
    """The plan section of RESULTS.md: the paper models' plans from their config values (in a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        return report_paper_models(paper_model_plans(batch, length, Path(tmp)), batch, length)


def gradient_difference(args: argparse.Namespace) -> float:
    """max ‖G − .grad‖ / ‖.grad‖ of estimate against plain autograd, on the benchmark's model and batches."""
    model, batches = build(args)
    plain_pass(model, batches)  # the check that estimate's G is autograd's
    difference = max_relative_difference(model, estimate_pass(model, batches).sums)
    del model, batches
    gc.collect()
    return difference


def plan_and_peaks(args: argparse.Namespace, runs: dict[str, list[dict]]) -> tuple[plan.ModelFacts, dict[str, dict]]:
    """The plan's facts for the benchmark's model, and the runs whose peaks it is set against: estimate over the
    batches twice, the first round's LoRA-SB step, and (bundled model) a merge of a rank-`--rank` factors file."""
    with tempfile.TemporaryDirectory() as tmp:
        facts = plan.model_facts(
            plan_ref(args, Path(tmp) / "config"),
            batch_size=args.batch_size,
            max_length=args.seq_len,
            rank=args.rank,
            dtype=torch.float32,
        )
        measured = {"estimate-twice": child("estimate-twice", args), "lorasb-step": runs["lorasb-step"][0]}
        if args.model != "random":
            measured["merge"] = child("merge", args, ["--factors", str(make_factors(args, Path(tmp)))])
    return facts, measured


def main() -> None:
    args = parse_args()
    if args.measure:
        measure(args)
        return
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    batch, length = (int(x) for x in args.plan_batch.split("x"))
    if args.plan_only:
        paper = paper_section(batch, length)
        write_section(RESULTS_PATH, "plan", paper)
        print(paper)
        return

    log(f"== peers on {describe_model(args)}")
    runs = rounds(args)
    difference = gradient_difference(args)
    if args.peers_only:
        print(report_peers(args, runs, difference))
        print(json.dumps({v: medians(r) for v, r in runs.items()}))
        return
    paper = paper_section(batch, length)

    log("== plan against measured peaks")
    facts, measured = plan_and_peaks(args, runs)
    text = "\n".join([report_peers(args, runs, difference), report_plan(args, facts, measured)])
    setup = {
        **machine_info(),
        "date": datetime.date.today().isoformat(),
        "1-min load average at start / end": f"{load_start:.2f} / {os.getloadavg()[0]:.2f}",
        "whole run": f"{(time.perf_counter() - started) / 60:.1f} min",
        "command": "python -m benchmarks.estimate " + " ".join(sys.argv[1:]),
    }
    text = f"# estimate: peers, the §4 memory contract and the memory plan\n\n{text}\n{key_values(setup)}\n"
    if not args.quick:
        write_result("estimate", text)
        write_section(RESULTS_PATH, "estimate", text)
        write_section(RESULTS_PATH, "plan", paper)
        log(f"wrote benchmarks/results/estimate.md and {RESULTS_PATH}")
    print(text)
    print(paper)


if __name__ == "__main__":
    main()
