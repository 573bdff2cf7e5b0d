"""The estimate and decompose contract on a real model the tests never load (docs/design.md §4):

- the update's sign matches an independent autograd reference on ≥ 99% of entries;
- decompose's factors are within 1% of the Eckart–Young optimum ‖ΔW − trunc_r(ΔW)‖_F.

Runs `lorasb estimate` / `lorasb decompose` as a user would (subprocesses), then recomputes G with plain autograd
(requires_grad on the target weights, one sample at a time) and exact SVDs. Writes results/agreement.md.
Usage: python -m benchmarks.agreement [--model smollm2-135m] [--samples 8] [--rank 32] [--svd-modules 6]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lorasb_cli import artifacts, data, loss, models

OUT = Path(__file__).parent / "results" / "agreement.md"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="gsm-symbolic")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--svd-modules", type=int, default=6, help="modules checked against an exact SVD")
    return parser.parse_args()


def run_stages(args: argparse.Namespace, update: Path, factors: Path) -> None:
    """`lorasb estimate` into `update`, then `lorasb decompose` into `factors`, as a user runs them."""
    lorasb = [sys.executable, "-m", "lorasb_cli"]
    subprocess.run(
        [
            *lorasb,
            "estimate",
            "-m",
            args.model,
            "-d",
            args.data,
            "--size",
            "200",
            "--samples",
            str(args.samples),
            "--max-length",
            "256",
            "-q",
            "-o",
            str(update),
        ],
        check=True,
    )
    subprocess.run([*lorasb, "decompose", str(update), "--rank", str(args.rank), "-q", "-o", str(factors)], check=True)


def sign_agreement(update_file: artifacts.Artifact, reference: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(entries whose sign matches −sign of the autograd G, entries)."""
    agree = total = 0
    for name in update_file.names:
        ours = update_file.get(name)
        ref = -torch.sign(reference[name.removesuffix(".weight")])
        agree += int((ours == ref).sum())
        total += ours.numel()
    return agree, total


def excess_residuals(update_file: artifacts.Artifact, factors_file: artifacts.Artifact, args) -> list[float]:
    """‖ΔW − B·R·A‖_F / ‖ΔW − trunc_r(ΔW)‖_F − 1 of the first `--svd-modules` modules (exact SVDs)."""
    excess = []
    for name in update_file.names[: args.svd_modules]:
        module = name.removesuffix(".weight")
        delta = artifacts.load_update(update_file, name).double()
        b, r, a = (factors_file.get(f"{module}.lora_{x}").double() for x in "BRA")
        residual = torch.linalg.matrix_norm(delta - b @ r @ a)
        optimum = torch.linalg.svdvals(delta)[args.rank :].square().sum().sqrt()
        excess.append(float(residual / optimum - 1))
    return excess


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        update, factors = Path(tmp) / "u.safetensors", Path(tmp) / "f.safetensors"
        run_stages(args, update, factors)
        update_file, factors_file = artifacts.Artifact(update), artifacts.Artifact(factors)
        reference = autograd_g(args.model, args.data, args.samples)
        agree, total = sign_agreement(update_file, reference)
        excess = excess_residuals(update_file, factors_file, args)

    lines = [
        "# estimate/decompose agreement on a real model",
        "",
        (
            f"Model `{args.model}`, data `{args.data}` (train, 200 rows), {args.samples} samples, max length 256, "
            f"all-linear targets ({len(update_file.names)} modules), rank {args.rank}."
        ),
        "",
        "| check | measured | target |",
        "|---|---|---|",
        f"| sign agreement with autograd | {agree / total:.4%} of {total:,} entries | ≥ 99% |",
        f"| excess residual over the exact SVD optimum, worst of {len(excess)} modules | {max(excess):.4%} | < 1% |",
        "",
        "Disagreeing signs are entries whose G is within float32 summation noise of zero.",
    ]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def autograd_g(model_name: str, data_name: str, samples: int) -> dict[str, torch.Tensor]:
    """Σ_i ∇_W L_i with plain autograd, the same drawn samples as estimate (seed 0), one sample per backward."""
    ref = models.resolve_model(model_name)
    model, tokenizer = models.load_model(ref, dtype=torch.float32, device=torch.device("cpu"))
    modules = models.resolve_targets(model, "all-linear")
    rows = data.load_dataset_rows(data_name, "train", size=200, seed=0).rows
    indices = data.sample_indices(len(rows), frac=None, samples=samples, seed=0)
    examples = data.encode([rows[i] for i in indices], "prompt-response", tokenizer, 256)
    named = dict(model.named_modules())
    for name in modules:
        named[name].weight.requires_grad_(True)
    for batch in data.make_batches(examples, 1, tokenizer.pad_token_id):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss.per_sample_loss_sum(logits, batch["labels"])[0].backward()
    return {name: named[name].weight.grad for name in modules}


if __name__ == "__main__":
    main()
