"""The LoRA-SB paper's quality claims, tested on the bundled real models (DESIGN.md §7), with `lorasb compare`.

Every method trains the same steps on the same rows; each gets its own learning rate from a sweep of three
values (seed 0, scored by loss on a validation slice cut from the *training* split, never the test split), and
is then run with 3 seeds and scored on the test split. Sections (each a resumable compare grid under
benchmarks/out/quality/<section>/, so an interrupted run continues where it stopped):

  minilm    MiniLM-L6 on reuters-r8, attention + FFN: LoRA-SB r 8/16/24, LoRA-XS r 8/16/24, LoRA r 8, head, full
  smollm2   SmolLM2-135M, all linear layers, on `arithmetic`: LoRA-SB and LoRA-XS r 16/32/64, LoRA / rsLoRA /
            PiSSA / DoRA r 8, full fine-tuning (also the step-0 losses and loss curves of paper Figure 2)
  inits     init ablation at r 32: lorasb, kaiming, noisy (σ = 1 and 10, in units of η), non-orthonormal
  samples   estimate sample count 1, 4, 16, 64 at r 32 (paper Table 5)
  eta       η 1e-6, 1e-5, 1e-4 against --init-scale auto at r 32
  inilora   IniLoRA, IniLoRA-α/β, MiLoRA, PiSSA and LoRA at r 8

Usage:
    python -m benchmarks.quality                       # every section, then benchmarks/RESULTS.md
    python -m benchmarks.quality --only minilm,smollm2 # some sections (the report takes every finished one)
    python -m benchmarks.quality --report              # only rebuild the report from finished cells
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import machine_info, write_section
from lorasb_cli import compare, console, data
from lorasb_cli.compare import Cell, Settings

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "quality"
FIGURES = HERE / "results" / "quality"
RESULTS_PATH = HERE / "RESULTS.md"
SEEDS = 3

SMOLLM2 = {
    "model": "smollm2-135m",
    "steps": 20,
    "batch_size": 8,
    "max_length": 96,
    "task": "gsm8k",
    "max_new_tokens": 16,
    "data": "arithmetic",
    "train_rows": 2000,
    "val_rows": 64,
    "test_rows": 64,
    "targets": "all-linear",
    # arithmetic answers are bare numbers (no "The answer is" / "####"): GSM8K's strict score needs a marker
    "metric": "flexible_accuracy",
}
MINILM = {
    "model": "minilm-l6",
    "steps": 50,
    "batch_size": 16,
    "max_length": 64,
    "task": "classification",
    "max_new_tokens": None,
    "data": "reuters-r8",
    "train_rows": 2000,
    "val_rows": 96,
    "test_rows": 200,
    "targets": "query,key,value,intermediate.dense,output.dense",
}

# Learning-rate grids: each method's plausible range for the step budget above.
LORA_LRS = (3e-4, 1e-3, 3e-3)
SMOLLM2_SWEEP = {  # (method, rank): lrs; the swept rank stands for the method's other ranks
    ("lorasb", 32): (1e-3, 3e-3, 1e-2),
    ("lora-xs", 32): (1e-4, 1e-3, 1e-2),
    ("lora", 8): LORA_LRS,
    ("rslora", 8): LORA_LRS,
    ("pissa", 8): LORA_LRS,
    ("dora", 8): LORA_LRS,
    ("full", None): (1e-5, 3e-5, 1e-4),
}
INILORA_SWEEP = {("inilora", 8): LORA_LRS, ("milora", 8): LORA_LRS}
MINILM_SWEEP = {
    ("lorasb", 16): (1e-3, 5e-3, 2e-2),
    ("lora-xs", 16): (1e-3, 1e-2, 1e-1),
    ("lora", 8): LORA_LRS,
    ("head", None): (1e-3, 1e-2, 3e-2),
    ("full", None): (3e-5, 1e-4, 3e-4),
}


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def split_files(spec: dict) -> dict[str, str]:
    """train / val (cut from the training split) / test JSONL files, drawn once with seed 0."""
    folder = OUT / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {part: folder / f"{spec['data']}-{part}.jsonl" for part in ("train", "val", "test")}
    if not all(p.is_file() for p in paths.values()):
        train = data.load_dataset_rows(spec["data"], "train", size=spec["train_rows"] + spec["val_rows"], seed=0).rows
        test = data.load_dataset_rows(spec["data"], "test", size=spec["test_rows"], seed=0).rows
        parts = {"train": train[: spec["train_rows"]], "val": train[spec["train_rows"] :], "test": test}
        for part, rows in parts.items():
            paths[part].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {part: str(p) for part, p in paths.items()}


def settings(spec: dict, eval_part: str, task: str | None = None, **overrides) -> Settings:
    files = split_files(spec)
    return Settings(
        model=spec["model"],
        train_data=files["train"],
        eval_data=files[eval_part],
        task=task or spec["task"],
        max_steps=spec["steps"],
        batch_size=spec["batch_size"],
        max_length=spec["max_length"],
        targets=spec["targets"],
        max_new_tokens=spec["max_new_tokens"],
        metric=spec.get("metric"),
        **overrides,
    )


def sweep(name: str, spec: dict, grid: dict, run: bool) -> dict[str, float]:
    """The best lr of each method: lowest loss on the validation slice after the run (seed 0)."""
    sweep_task = "perplexity" if spec["task"] != "classification" else "classification"
    cells = [Cell(method=m, rank=r, seed=0, lr=lr) for (m, r), lrs in grid.items() for lr in lrs]
    results = _grid(OUT / f"{name}-sweep", settings(spec, "val", sweep_task), cells, run)
    best: dict[str, tuple[float, float]] = {}
    for result in results:
        cell = Cell.from_record(result.cell)
        loss = result.eval_loss if result.eval_loss is not None else float("inf")
        if cell.method not in best or loss < best[cell.method][1]:
            best[cell.method] = (cell.lr, loss)
    return {method: lr for method, (lr, _) in best.items()}


def _grid(folder: Path, setup: Settings, cells: list[Cell], run: bool) -> list[compare.CellResult]:
    """Run the grid (when `run`) and return its finished cells."""
    if run:
        log(f"{folder.name}: {len(cells)} cells")
        with console.progress_bar(folder.name) as progress:
            return compare.run_grid(folder, setup, cells, progress)
    finished = [folder / "cells" / c.key / "cell.json" for c in cells]
    return [compare.CellResult(**json.loads(p.read_text())) for p in finished if p.is_file()]


def seeded(pairs: list[tuple[str, int | None]], lrs: dict[str, float]) -> list[Cell]:
    return [Cell(method=m, rank=r, seed=s, lr=lrs[m]) for m, r in pairs for s in range(SEEDS)]


def section(name: str, spec: dict, cells: list[Cell], run: bool) -> list[dict] | None:
    """Run one section's cells on the test split, in the model's one grid folder (so a cell that two sections
    share, such as LoRA-SB r 32 at n 32 and η 1e-5, runs once); write the section's report and PNGs."""
    grid_folder = OUT / spec["model"]
    setup = settings(spec, "test")
    results = _grid(grid_folder, setup, cells, run)
    if not results:
        return None
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    compare.write_report(folder, setup, results, title=name)
    FIGURES.mkdir(parents=True, exist_ok=True)
    for png in ("loss.png", "metric.png"):
        shutil.copyfile(folder / png, FIGURES / f"{name}-{png}")
    return compare.aggregate(results, setup.metric)


def build(sections: set[str], run: bool) -> dict[str, tuple[list[dict] | None, dict]]:
    tables: dict[str, tuple[list[dict] | None, dict]] = {}
    need_smollm2_lrs = sections & {"smollm2", "inits", "samples", "eta", "inilora"}
    lrs = sweep("smollm2", SMOLLM2, SMOLLM2_SWEEP, run) if need_smollm2_lrs else {}
    if "smollm2" in sections and lrs:
        pairs = [("lorasb", r) for r in (16, 32, 64)] + [("lora-xs", r) for r in (16, 32, 64)]
        pairs += [(m, 8) for m in ("lora", "rslora", "pissa", "dora")] + [("full", None)]
        tables["smollm2"] = (section("smollm2", SMOLLM2, seeded(pairs, lrs), run), lrs)
    lr = lrs.get("lorasb")
    if "inits" in sections and lr:
        cells = [Cell("lorasb", 32, s, lr) for s in range(SEEDS)]
        cells += [Cell(init, 32, s, lr) for init in ("kaiming", "non-orthonormal") for s in range(SEEDS)]
        cells += [
            Cell("noisy", 32, s, lr, label=f"noisy σ={sigma:g}", options={"noise_std": sigma})
            for sigma in (1.0, 10.0)
            for s in range(SEEDS)
        ]
        tables["inits"] = (section("inits", SMOLLM2, cells, run), {"all": lr})
    if "samples" in sections and lr:
        cells = [
            Cell("lorasb", 32, s, lr, label=f"lorasb n={n}", samples=n) for n in (1, 4, 16, 64) for s in range(SEEDS)
        ]
        cells += [Cell("lorasb", 32, s, lr) for s in range(SEEDS)]  # n = 32
        tables["samples"] = (section("samples", SMOLLM2, cells, run), {"all": lr})
    if "eta" in sections and lr:
        cells = [
            Cell("lorasb", 32, s, lr, label=f"lorasb η={eta:g}", eta=eta) for eta in (1e-6, 1e-4) for s in range(SEEDS)
        ]
        cells += [Cell("lorasb", 32, s, lr) for s in range(SEEDS)]  # η = 1e-5
        cells += [
            Cell("lorasb", 32, s, lr, label="lorasb η=1e-5 auto", options={"init_scale": "auto"}) for s in range(SEEDS)
        ]
        tables["eta"] = (section("eta", SMOLLM2, cells, run), {"all": lr})
    if "minilm" in sections:
        minilm_lrs = sweep("minilm", MINILM, MINILM_SWEEP, run)
        if minilm_lrs:
            pairs = [("lorasb", r) for r in (8, 16, 24)] + [("lora-xs", r) for r in (8, 16, 24)]
            pairs += [("lora", 8), ("head", None), ("full", None)]
            tables["minilm"] = (section("minilm", MINILM, seeded(pairs, minilm_lrs), run), minilm_lrs)
    if "inilora" in sections and lrs:
        own = sweep("inilora", SMOLLM2, INILORA_SWEEP, run)
        if {"inilora", "milora"} <= set(own):  # (a report taken mid-sweep lacks one)
            own["inilora-alpha"] = own["inilora-beta"] = own["inilora"]
            cells = seeded([(m, 8) for m in ("inilora", "inilora-alpha", "inilora-beta", "milora")], own)
            cells += seeded([("pissa", 8), ("lora", 8)], lrs)
            tables["inilora"] = (
                section("inilora", SMOLLM2, cells, run),
                {**own, "pissa": lrs["pissa"], "lora": lrs["lora"]},
            )
    return tables


TITLES = {
    "smollm2": "SmolLM2-135M on arithmetic (paper Tables 1–2's shape): exact match and response loss",
    "inits": "Ablation: initialization at r = 32 (paper Table 4, Appendix E)",
    "samples": "Ablation: estimate sample count at r = 32 (paper Table 5; the `lorasb` row is n = 32)",
    "minilm": "MiniLM-L6 on reuters-r8 (paper Table 3's shape): accuracy",
    "eta": "Ablation: η of the simulated first step against --init-scale auto, r = 32 (the `lorasb` row is η = 1e-5)",
    "inilora": "IniLoRA's comparison at r = 8",
}


def report(tables: dict, seconds: float) -> str:
    lines = [
        "# Quality: the paper's claims on the bundled real models",
        "",
        "Written by `python -m benchmarks.quality`. Machine: "
        + (", ".join(f"{k} {v}" for k, v in machine_info().items()) + "."),
        "",
        (
            f"SmolLM2-135M: {SMOLLM2['steps']} steps of batch {SMOLLM2['batch_size']} (max length "
            f"{SMOLLM2['max_length']}) on {SMOLLM2['train_rows']} `arithmetic` train rows, scored on "
            f"{SMOLLM2['test_rows']} test rows (greedy, {SMOLLM2['max_new_tokens']} new tokens; exact match of the "
            "final number) and by the mean response loss on them. MiniLM-L6: "
            f"{MINILM['steps']} steps of batch {MINILM['batch_size']} on {MINILM['train_rows']} `reuters-r8` rows, "
            f"accuracy on {MINILM['test_rows']} test rows. Estimates: 32 samples, η 1e-5, one per seed. "
            f"Every cell: {SEEDS} seeds (0, 1, 2), linear schedule, 5% warm-up, AdamW without weight decay. The lr of "
            "each method is the best of three on a validation slice of the training split (seed 0); the ablations use "
            "LoRA-SB's."
        ),
        "",
    ]
    for name, (rows, lrs) in tables.items():
        lines.append(f"## {TITLES[name]}")
        lines.append("")
        if not rows:
            lines += ["Not run yet.", ""]
            continue
        lines.append(compare.markdown_table(rows))
        lines.append(f"Learning rates (from the sweep): {', '.join(f'{k} {v:g}' for k, v in lrs.items())}.")
        lines.append("")
        lines.append(f"![{name} loss curves](results/quality/{name}-loss.png)")
        lines.append(f"![{name} metric vs trainable parameters](results/quality/{name}-metric.png)")
        lines.append("")
    lines.append(f"Run time of this invocation: {seconds / 60:.1f} min.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(TITLES), help="comma list of sections")
    parser.add_argument("--report", action="store_true", help="rebuild the report from finished cells only")
    args = parser.parse_args()
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - set(TITLES)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(TITLES)}")
    console.setup_logging(debug=False, quiet=False)
    start = time.perf_counter()
    build(sections, run=not args.report)
    tables = build(set(TITLES), run=False)  # every finished section, run now or before
    text = report(tables, time.perf_counter() - start)
    write_section(RESULTS_PATH, "quality", text)
    print(text)


if __name__ == "__main__":
    main()
