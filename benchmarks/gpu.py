"""7B figures on one GPU: estimate, decompose, a LoRA-SB step against PEFT LoRA, and the plan (issue 13 item 9).

A random-init Mistral-7B-shaped model (`--shape mistral-7b`: hidden 4096, 32 layers, 32/8 heads, MLP 14336,
vocab 32000) is built in bfloat16 directly on the device — random weights are enough for time and memory,
nothing is downloaded. Data: `--samples` random-token samples of `--seq-len` tokens, every token supervised, in
batches of `--batch-size`. In one run (under 8 minutes on an H100/H200-class GPU):

1. estimate: `estimate.sum_gradients` over the 224 all-linear targets, accumulators on the device (float32);
2. decompose: ΔW = −η·sign(G) of every target, `linalg.truncated_svd` at `--lorasb-rank` (the paper: under
   a second), timed over all 224 modules;
3. train: `--steps` steps (after one warm-up step that also allocates AdamW's state) of LoRA-SB at
   `--lorasb-rank` (B, R, A from step 2; only R trained), of the limit (the same forward and backward with every
   weight frozen and no adapter: what any adapter's step costs at least) and of PEFT LoRA at `--lora-rank`
   (A, B trained), each `model(input_ids, labels).loss.backward()`, AdamW step, zero_grad, on one batch; time
   per step and peak; LoRA-SB / limit and PEFT LoRA / limit are the adapters' overheads;
4. the plan: `lorasb_cli.plan` (meta device, from the config alone) against the measured peaks.

Peaks are `torch.cuda.max_memory_allocated` (tensor bytes, weights included) reset before each phase. The
section of benchmarks/RESULTS.md it writes is labelled with the device's name.

    python -m benchmarks.gpu                                   # on a CUDA machine: writes the RESULTS.md section
    python -m benchmarks.gpu --shape tiny --device cpu --no-write   # the same code paths in seconds, on CPU
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks.common import MISTRAL_7B_SHAPE, markdown_table, write_section

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
GIB = 2**30
SHAPES = {
    "mistral-7b": MISTRAL_7B_SHAPE,
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 448,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 1000,
    },
}


class Clock:
    """Wall seconds of device work: synchronizes before reading the time."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


class Memory:
    """Peak tensor bytes on the device since the last `reset` (CUDA's allocator; on CPU: nothing measured)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The random model in `dtype` straight on `device` (never a float32 copy of 7B parameters)."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        **SHAPES[args.shape], max_position_embeddings=max(4096, args.seq_len), tie_word_embeddings=False
    )
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), config


def make_batches(args: argparse.Namespace, vocab: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.samples, args.seq_len), generator=generator)
    return [
        {
            "input_ids": ids[i : i + args.batch_size].to(device),
            "labels": ids[i : i + args.batch_size].to(device),
            "attention_mask": torch.ones_like(ids[i : i + args.batch_size]).to(device),
        }
        for i in range(0, args.samples, args.batch_size)
    ]


def train_steps(model, batch: dict[str, torch.Tensor], steps: int, clock: Clock, memory: Memory) -> dict:
    """One warm-up step (allocates AdamW's state), then `steps` timed steps; the peak covers all of them."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    memory.reset()
    step()
    times = []
    for _ in range(steps):
        start = clock.now()
        step()
        times.append(clock.now() - start)
    return {"seconds": statistics.median(times), "peak": memory.peak(), "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="mistral-7b")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --shape tiny, to test)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lorasb-rank", type=int, default=96)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per variant")
    parser.add_argument("--eta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/RESULTS.md")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "benchmarks.gpu: no CUDA device here (torch.cuda.is_available() is False); it measures 7B "
            "figures on a GPU. To test its code paths on CPU: python -m benchmarks.gpu --shape tiny --device cpu "
            "--no-write"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    text = run(args, device)
    if not args.no_write:
        write_section(RESULTS_PATH, "gpu", text)
        print(f"wrote {RESULTS_PATH}", file=sys.stderr)
    print(text)


def plan_phases(args: argparse.Namespace, config, dtype: torch.dtype, where: str):
    """The plan's facts (from the config alone, saved in a temporary folder) and its estimate and train stages."""
    from lorasb_cli import models, plan

    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)  # the plan reads the config alone
        ref = models.ModelRef(id=f"{args.shape} (random)", path=folder)
        facts = plan.model_facts(
            ref, batch_size=args.batch_size, max_length=args.seq_len, rank=args.lorasb_rank, dtype=dtype
        )
    return facts, plan.estimate_plan(facts, device=where, accumulate_on="device"), plan.train_plan(facts, device=where)


def estimate_phase(model, modules: list[str], batches, device: torch.device, clock: Clock, memory: Memory):
    """1. estimate, the accumulators on the device: (its result, seconds, peak)."""
    from lorasb_cli.estimate import sum_gradients

    memory.reset()
    start = clock.now()
    result = sum_gradients(model, modules, batches, accumulate_on=device)
    seconds = clock.now() - start
    return result, seconds, memory.peak()


def decompose_phase(sums: dict[str, torch.Tensor], modules: list[str], args: argparse.Namespace, clock: Clock):
    """2. decompose: the SVD of the update −η·sign(G), module by module on the device, each G popped from `sums`
    (freed) as it is used: (factors, seconds)."""
    from lorasb_cli.linalg import truncated_svd

    factors = {}
    start = clock.now()
    for name in modules:
        g = sums.pop(name)
        u, s, vh = truncated_svd(torch.sign(g).neg_().mul_(args.eta), args.lorasb_rank)
        factors[name] = (u, torch.diag(s), vh)
        del g
    return factors, clock.now() - start


def limit_steps(model, batch, steps: int, clock: Clock, memory: Memory) -> dict:
    """The physical limit of an adapter's step: forward and backward through every layer with every weight frozen
    and no adapter. The embeddings' output asks for a gradient, so backward computes every activation gradient an
    adapter's step needs and no weight gradient."""
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
    try:
        return train_steps(model, batch, steps, clock, memory)
    finally:
        hook.remove()


def train_phase(model, modules: list[str], batch, args: argparse.Namespace, clock: Clock, memory: Memory, log):
    """3. train steps on the same base: LoRA-SB (already injected) at --lorasb-rank, the limit (no adapter, every
    weight frozen), then PEFT LoRA at --lora-rank."""
    from peft import LoraConfig, get_peft_model

    from lorasb_cli import adapter

    lorasb = train_steps(model, batch, args.steps, clock, memory)
    adapter.remove(model)
    model.requires_grad_(False)
    gc.collect()
    log(f"LoRA-SB step: {lorasb['seconds']:.2f} s")
    limit = limit_steps(model, batch, args.steps, clock, memory)
    log(f"limit step: {limit['seconds']:.2f} s")
    peft_model = get_peft_model(
        model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=modules, lora_dropout=0.0)
    )
    lora = train_steps(peft_model, batch, args.steps, clock, memory)
    log(f"PEFT LoRA step: {lora['seconds']:.2f} s")
    return lorasb, limit, lora


def run(args: argparse.Namespace, device: torch.device) -> str:
    from lorasb_cli import adapter, models, plan

    started = time.perf_counter()
    clock, memory = Clock(device), Memory(device)
    dtype = getattr(torch, args.dtype)
    where = plan.place(device)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    model, config = build(args, device, dtype)
    modules = models.resolve_targets(model, "all-linear")
    batches = make_batches(args, config.vocab_size, device)
    log(
        f"built {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
        f"{len(modules)} targets) on {device}"
    )
    facts, planned_estimate, planned_train = plan_phases(args, config, dtype, where)
    log("planned")

    result, estimate_seconds, estimate_peak = estimate_phase(model, modules, batches, device, clock, memory)
    log(f"estimate: {estimate_seconds:.1f} s")
    factors, decompose_seconds = decompose_phase(result.sums, modules, args, clock)
    del result
    gc.collect()
    log(f"decompose: {decompose_seconds:.2f} s")

    # 3. LoRA-SB's factors go into the model here, so that no reference to them outlives the injection
    model.train()
    adapter.inject(model, factors)
    del factors
    lorasb, limit, lora = train_phase(model, modules, batches[0], args, clock, memory, log)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    minutes = (time.perf_counter() - started) / 60
    return report(
        args,
        name,
        facts,
        planned_estimate,
        planned_train,
        {
            "estimate": (estimate_seconds, estimate_peak),
            "decompose": decompose_seconds,
            "lorasb": lorasb,
            "limit": limit,
            "lora": lora,
        },
        minutes,
    )


def gib(value: int | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def ratio(a, b) -> str:
    return "—" if a is None or b is None else f"{a / b:.3f}"


def phase_table(args, facts, planned_estimate, planned_train, measured: dict) -> str:
    """Seconds and peak of each phase, beside the plan where it has one."""
    est_seconds, est_peak = measured["estimate"]
    sb, lora = measured["lorasb"], measured["lora"]
    tokens = args.samples * args.seq_len
    return markdown_table(
        ["phase", "seconds", "peak (GiB)", "plan (GiB)", "plan / peak"],
        [
            [
                f"estimate: {args.samples} samples × {args.seq_len} tokens ({tokens / est_seconds:,.0f} tokens/s)",
                f"{est_seconds:.2f}",
                gib(est_peak),
                gib(planned_estimate.total),
                ratio(planned_estimate.total, est_peak),
            ],
            [
                f"decompose: truncated SVD of {len(facts.targets)} updates at r={args.lorasb_rank}",
                f"{measured['decompose']:.2f}",
                "",
                "",
                "",
            ],
            [
                f"train step: LoRA-SB r={args.lorasb_rank}",
                f"{sb['seconds']:.3f}",
                gib(sb["peak"]),
                gib(planned_train.total),
                ratio(planned_train.total, sb["peak"]),
            ],
            [
                "train step: limit (no adapter, every weight frozen)",
                f"{measured['limit']['seconds']:.3f}",
                gib(measured["limit"]["peak"]),
                "",
                "",
            ],
            [f"train step: PEFT LoRA r={args.lora_rank}", f"{lora['seconds']:.3f}", gib(lora["peak"]), "", ""],
        ],
    )


def versus_table(args, sb: dict, limit: dict, lora: dict) -> str:
    """LoRA-SB's train step against PEFT LoRA's: trainable parameters, step time, peak; each step against the
    limit."""
    counts = (
        f"{sb['trainable']:,} / {lora['trainable']:,} = {sb['trainable'] / lora['trainable']:.4f} "
        f"({lora['trainable'] / sb['trainable']:.1f}× fewer)"
    )
    return markdown_table(
        [f"LoRA-SB r={args.lorasb_rank} / PEFT LoRA r={args.lora_rank}", "value"],
        [
            ["trainable parameters", counts],
            ["step time (median)", ratio(sb["seconds"], lora["seconds"])],
            ["peak memory", ratio(sb["peak"], lora["peak"])],
            ["LoRA-SB step / limit", ratio(sb["seconds"], limit["seconds"])],
            ["PEFT LoRA step / limit", ratio(lora["seconds"], limit["seconds"])],
        ],
    )


def report(args, device_name: str, facts, planned_estimate, planned_train, measured: dict, minutes: float) -> str:
    stages = phase_table(args, facts, planned_estimate, planned_train, measured)
    versus = versus_table(args, measured["lorasb"], measured["limit"], measured["lora"])
    items = "; ".join(f"{i.what} {i.bytes / GIB:.2f}" for i in planned_estimate.items)
    return (
        f"# 7B-shaped figures on {device_name}\n\n"
        f"Written by `python -m benchmarks.gpu {' '.join(sys.argv[1:])}` on {datetime.date.today().isoformat()} "
        f"({minutes:.1f} min): random-init {args.shape} (Mistral architecture, {facts.parameters / 1e9:.2f} B "
        f"parameters, {len(facts.targets)} all-linear targets) in {args.dtype} on the device; random tokens, all "
        f"supervised, batch {args.batch_size} × {args.seq_len}; torch {torch.__version__}.\n\n"
        f"{stages}\n\n{versus}\n\n"
        "Peaks: `torch.cuda.max_memory_allocated` (weights included), reset before each phase. estimate keeps its "
        f"float32 accumulators on the device; its plan: {items} (GiB). Train steps: one warm-up step (AdamW's "
        f"state), then the median of {args.steps}; PEFT's LoRA A, B stay float32 (its default autocast of adapter "
        "dtypes), as LoRA-SB's R, B, A.\n"
    )


if __name__ == "__main__":
    main()
