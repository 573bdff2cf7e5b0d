"""Randomized vs exact SVD for `lorasb decompose` on sign updates (docs/design.md §4).

Per module-sized matrix ΔW and rank r: the wall time of `lorasb_cli.linalg.truncated_svd` with its
defaults (`torch.svd_lowrank`, niter and oversampling as decompose uses them) against the exact path
(`exact=True`, `torch.linalg.svd`), and the relative excess residual

    ‖ΔW − B·R·A‖_F / ‖ΔW − trunc_r(ΔW)‖_F − 1        target < 1 %

where trunc_r(ΔW) is the Eckart–Young optimum from the exact singular values. Two kinds of ±1 matrix:
`random` (i.i.d. signs: a flat spectrum, the hard case) and `low-rank` (sign of a rank-64 matrix with
singular values ∝ 1/i plus i.i.d. gaussian noise at `--noise` times its entry RMS, closer to a real sign(G),
since gradient sums are approximately low rank).

    python -m benchmarks.decompose            # writes benchmarks/results/decompose.md
    python -m benchmarks.decompose --quick    # small smoke run, prints only
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial

import torch

from benchmarks.common import best_seconds, key_values, machine_info, markdown_table, write_result
from lorasb_cli.linalg import DEFAULT_NITER, oversampling, truncated_svd

EXCESS_TARGET = 0.01
SIGNAL_RANK = 64


def sign_matrix(rows: int, cols: int, noise: float | None, generator: torch.Generator) -> torch.Tensor:
    """A float32 ±1 matrix: i.i.d. signs when `noise` is None, else the low-rank kind (module docstring)."""
    if noise is None:
        return torch.randint(0, 2, (rows, cols), generator=generator).float().mul_(2).sub_(1)
    u = torch.linalg.qr(torch.randn(rows, SIGNAL_RANK, generator=generator)).Q
    v = torch.linalg.qr(torch.randn(cols, SIGNAL_RANK, generator=generator)).Q
    s = 1.0 / torch.arange(1, SIGNAL_RANK + 1, dtype=torch.float32)
    signal = (u * s) @ v.T
    signal /= signal.square().mean().sqrt()
    signal += noise * torch.randn(rows, cols, generator=generator)
    return torch.sign(signal)


def excess_residual(matrix: torch.Tensor, factors, optimum: float) -> float:
    u, s, vh = factors
    residual = float((matrix - (u * s) @ vh).double().norm())
    return residual / optimum - 1


def measure(
    noise: float | None, shape: tuple[int, int], ranks: list[int], args: argparse.Namespace
) -> list[list[object]]:
    """Table rows for one matrix: the exact SVD once (it serves every rank), the randomized one per rank."""
    generator = torch.Generator().manual_seed(args.seed)
    matrix = sign_matrix(*shape, noise, generator)
    start = time.perf_counter()
    _, singular, _ = truncated_svd(matrix, min(shape), exact=True)
    exact_seconds = time.perf_counter() - start
    energy = singular.double().square()
    total = float(energy.sum())
    rows = []
    for rank in ranks:
        optimum = float(energy[rank:].sum().sqrt())
        torch.manual_seed(args.seed)
        seconds = best_seconds(partial(truncated_svd, matrix, rank), args.repeats)
        torch.manual_seed(args.seed)
        excess = excess_residual(matrix, truncated_svd(matrix, rank), optimum)
        rows.append(
            [
                "random" if noise is None else f"low-rank, noise {noise:g}",
                f"{shape[0]}×{shape[1]}",
                rank,
                f"{float(energy[:rank].sum()) / total:.3f}",
                f"{exact_seconds:.3g}",
                f"{seconds:.3g}",
                f"{exact_seconds / seconds:.0f}×",
                f"{100 * excess:.3f} %",
                "met" if excess < EXCESS_TARGET else "MISSED",
            ]
        )
        print(" | ".join(str(c) for c in rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", default="4096x4096,4096x14336", help="comma list of MxN (default: Llama/Mistral-7B sizes)"
    )
    parser.add_argument("--ranks", default="32,96", help="comma list of ranks")
    parser.add_argument(
        "--noise", default="0.3,1.0", help="comma list of noise RMS / signal RMS, one low-rank ΔW per value"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed randomized SVDs per rank (the fastest counts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test; writes no results file")
    args = parser.parse_args()
    if args.quick:
        args.shapes, args.ranks, args.repeats = "512x512,512x1376", "8,32", 2
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    kinds = [None, *(float(x) for x in args.noise.split(","))]

    warm_up = torch.randn(256, 256)  # LAPACK and thread-pool start-up stay out of the first timing
    truncated_svd(warm_up, 8, exact=True)
    truncated_svd(warm_up, 8)
    rows = [row for shape in shapes for noise in kinds for row in measure(noise, shape, ranks, args)]
    table = markdown_table(
        [
            "ΔW",
            "shape",
            "rank",
            "energy in top r",
            "exact SVD (s)",
            "svd_lowrank (s, best of repeats)",
            "speed-up",
            "excess residual",
            "< 1 %",
        ],
        rows,
    )
    setup = {
        **machine_info(),
        "randomized": f"`torch.svd_lowrank` via `truncated_svd`: niter {DEFAULT_NITER}, "
        f"q = r + max(16, r/2) ({', '.join(f'r {r}: q {r + oversampling(r)}' for r in ranks)}), float32",
        "exact": "`torch.linalg.svd(full_matrices=False)` float32, timed once per matrix (serves every rank)",
        "low-rank ΔW": f"sign(rank-{SIGNAL_RANK} matrix with σ_i ∝ 1/i + gaussian noise at `noise`× its entry RMS)",
        "seed": str(args.seed),
    }
    text = (
        "# decompose: randomized vs exact truncated SVD of sign updates\n\n"
        f"{table}\n\n"
        "excess residual = ‖ΔW − B·R·A‖_F / ‖ΔW − trunc_r(ΔW)‖_F − 1 (docs/design.md §4: must stay below 1 %); "
        "energy in top r = Σ_{i≤r} σ_i² / ‖ΔW‖_F².\n\n"
        f"{key_values(setup)}\n"
    )
    if not args.quick:
        print(f"wrote {write_result('decompose', text)}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    main()
