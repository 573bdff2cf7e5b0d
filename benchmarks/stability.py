"""How many samples the estimate needs (issue 17), on the bundled real models: the overlap of the top-r subspaces
of two halves of the sample as the sample grows (`estimate --report-ranks`), and the count `--samples auto`
settles on, against the paper's plateau (Table 5: past ~25 samples on MetaMathQA).

    python -m benchmarks.stability     # writes the `stability` section of benchmarks/RESULTS.md and a PNG
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import machine_info, markdown_table, write_section
from lorasb_cli import console, estimate, stability
from lorasb_cli.estimate import EstimateConfig

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "stability"
FIGURE = HERE / "results" / "stability.png"
RANKS = [8, 16, 32, 64]
SAMPLES = [8, 16, 32, 64, 128]  # the whole sample; each half holds half of it
MODELS = {  # name: (model, built-in data, max length, targets, batch)
    "SmolLM2-135M": ("smollm2-135m", "arithmetic", 64, "all-linear", 8),
    "MiniLM-L6": ("minilm-l6", "reuters-r8", 64, "query,key,value,intermediate.dense,output.dense", 16),
}


def log(message: str) -> None:
    print(f"[stability {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def config(name: str, out: Path, **options) -> EstimateConfig:
    model, data, max_length, targets, batch = MODELS[name]
    return EstimateConfig(
        model=model,
        data=data,
        size=2000,
        max_length=max_length,
        targets=targets,
        batch_size=batch,
        out=str(out),
        **options,
    )


def curve(name: str) -> tuple[dict[int, dict[int, float]], dict[int, float]]:
    """{samples: {rank: mean overlap over modules of B's and A's sides}} of the halves at each sample count, and
    {rank: the random value (r/m + r/n)/2 averaged over the modules}."""
    points, randoms = {}, {}
    for samples in SAMPLES:
        log(f"{name}: {samples} samples")
        out = OUT / f"{name}-{samples}.safetensors"
        summary = estimate.estimate(config(name, out, samples=samples, report_ranks=",".join(map(str, RANKS))))
        by_rank: dict[int, list[float]] = {}
        for _kind, rank, mean, _low, random in stability.by_kind(summary.stability):
            by_rank.setdefault(rank, []).append(mean)
            randoms.setdefault(rank, []).append(random)
        points[samples] = {rank: sum(v) / len(v) for rank, v in by_rank.items()}
    return points, {rank: sum(v) / len(v) for rank, v in randoms.items()}


def plot(curves: dict[str, dict[int, dict[int, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), dpi=120)
    for ax, (name, points) in zip(axes, curves.items()):
        for rank in RANKS:
            ax.plot(SAMPLES, [points[n].get(rank) for n in SAMPLES], "o-", label=f"r = {rank}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="samples (each half holds half)", ylabel="overlap of the halves' top-r subspaces", title=name)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE)
    plt.close(fig)


def main() -> None:
    console.setup_logging(debug=False, quiet=True)
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    curves, randoms, autos = {}, {}, {}
    for name in MODELS:
        curves[name], randoms[name] = curve(name)
        log(f"{name}: --samples auto")
        autos[name] = estimate.estimate(config(name, OUT / f"{name}-auto.safetensors", samples="auto")).samples_auto
    plot(curves)
    lines = [
        "# How many samples the estimate needs: subspace stability on the bundled models",
        "",
        "Written by `python -m benchmarks.stability`. Machine: "
        + ", ".join(f"{k} {v}" for k, v in machine_info().items())
        + ".",
        "",
        (
            "Overlap = ‖U_aᵀU_b‖²_F / r of the top-r singular subspaces of the two halves' sign updates (mean cos² "
            "of "
            "the principal angles; 1 = the same), averaged over B's and A's sides and over all target modules. Sample "
            "drawn with seed 0 from 2,000 built-in training rows (SmolLM2: `arithmetic`, max length 64, all linear "
            "layers; MiniLM: `reuters-r8`, attention + FFN)."
        ),
        "",
    ]
    for name, points in curves.items():
        lines.append(f"## {name}")
        lines.append("")
        header = ["samples (halves of)"] + [f"r = {r}" for r in RANKS]
        rows = [[f"{n} ({n // 2})"] + [f"{points[n].get(r, float('nan')):.3f}" for r in RANKS] for n in SAMPLES]
        rows.append(["random pair"] + [f"{randoms[name].get(r, float('nan')):.3f}" for r in RANKS])
        lines += [markdown_table(header, rows), ""]
        auto = autos[name]
        steps = ", ".join(
            f"{p['samples']}: {'-' if p['overlap'] is None else format(p['overlap'], '.3f')}" for p in auto["curve"]
        )
        lines.append(
            f"`--samples auto` (r = {auto['rank']}, threshold {auto['threshold']:g}, at most {auto['max_samples']}): "
            f"settled on **{auto['samples']}** samples ({'reached' if auto['reached'] else 'not reached'}); "
            f"overlap with the previous estimate by samples: {steps}."
        )
        lines.append("")
    lines += [
        "![overlap vs samples](results/stability.png)",
        "",
        f"Whole run: {(time.perf_counter() - start) / 60:.1f} min.",
    ]
    text = "\n".join(lines)
    write_section(HERE / "RESULTS.md", "stability", text)
    print(text)


if __name__ == "__main__":
    main()
