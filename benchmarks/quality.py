"""The LoRA-SB paper's quality claims, tested on the bundled real models (docs/design.md §7), with `lorasb compare`.

Every method trains the same steps on the same rows. Each family gets its own learning rate from compare's sweep
(`compare.sweep_lrs`: seed 0, 5 points half a decade apart, extended while an edge wins, scored by the per-sample
loss on a validation slice held out of the *training* rows, never the test rows) and is then run with 3 seeds and
scored on the test split. Sections, the first fifteen in the order a full run takes them (DEFAULT_SECTIONS; each
a resumable compare grid under benchmarks/out/quality/, so an interrupted run continues where it stopped):

  minilm-budget LoRA-SB r 16 against budgeted ranks at the same count on MiniLM (issue 17)
  budget        the same at r 32 on SmolLM2
  minilm        MiniLM-L6 on reuters-r8, attention + FFN: LoRA-SB r 8/16/24, LoRA-XS r 8/16/24, LoRA and LoRA-Pro
                r 8, head, full
  minilm-f1     the same cells by macro-F1 over the 8 topics (accuracy is two thirds `earn` and `acq`); no new runs
  minilm-head   the head alone at LoRA-SB's and LoRA's lr: every method trains the head at its own lr
  minilm-eta    the η rules of `eta` below on MiniLM at r 16
  smollm2-r16   SmolLM2-135M, all linear layers, on `arithmetic`: LoRA-SB and LoRA-XS r 16 (45× fewer parameters
                than LoRA r 8) beside the finished LoRA r 8 and LoRA-SB r 32; no sweep of its own
  eta           η of the estimate at r 32: the default 1e-5, the authors' lr / (warm-up × steps × epochs), auto
  smollm2       SmolLM2-135M: LoRA-SB r 32, LoRA-XS r 32, LoRA r 8, LoRA-Pro r 8
  smollm2-r64   LoRA-SB and LoRA-XS r 64 beside LoRA r 8 and LoRA-SB r 32; no sweep of its own
  smollm2-r64-swept  the same two families, each swept again at r 64
  smollm2-more  the rest of the grid: LoRA-GA / PiSSA / DoRA r 8, full, rsLoRA r 8
  minilm-lr-auto  `train --lr auto` (issue 31) on MiniLM: LoRA-SB r 16, LoRA r 8, LoRA-XS r 16, each beside its
                swept lr
  lr-auto       the same on SmolLM2: LoRA-SB r 32/16/64, LoRA r 8, LoRA-XS r 32
  smollm2-curve LoRA-SB r 32, LoRA r 8 and LoRA-XS r 32 over 400 steps, scored at 40, 150 and 400 (issue 32;
                compare --score-steps: one run per seed); about 4 h on 2 cores
  inits         init ablation at r 32: lorasb, kaiming, noisy (σ = 1 and 10, in units of η), non-orthonormal
  samples       estimate sample count 1, 4, 16, 64 at r 32 (paper Table 5)
  inilora       IniLoRA, IniLoRA-α/β, MiLoRA, PiSSA and LoRA at r 8

Usage:
    python -m benchmarks.quality                        # DEFAULT_SECTIONS in order, then RESULTS.md
    python -m benchmarks.quality --only minilm,smollm2  # some sections (the report takes every finished one)
    python -m benchmarks.quality --report               # only rebuild the report from finished cells
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
from lorasb_cli import compare, console, data, lr_range
from lorasb_cli.compare import Cell, GridSettings
from lorasb_cli.tasks import get_task

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "quality"
FIGURES = HERE / "results" / "quality"
RESULTS_PATH = HERE / "RESULTS.md"
SEEDS = 3

SMOLLM2 = {
    "model": "smollm2-135m",
    "steps": 40,
    "batch_size": 8,
    "max_length": 64,  # arithmetic rows are 30-50 tokens with the template
    "task": "gsm8k",
    "max_new_tokens": 6,  # answers are 1-4 digit numbers with a sign
    "data": "arithmetic",
    "train_rows": 2000,  # compare's sweep holds 200 of them out as its validation slice
    "test_rows": 300,
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
    "test_rows": 300,
    "targets": "query,key,value,intermediate.dense,output.dense",
}

# Each family's sweep: (method, the rank it is swept at) -> the centre of compare's sweep (5 points half a decade
# apart, extended at a winning edge). The family's other ranks reuse its rate.
SMOLLM2_SWEEP = {
    ("lorasb", 32): 3e-3,
    ("lora-xs", 32): 3e-3,
    ("lora", 8): 1e-3,
    ("lora-pro", 8): 1e-3,
    ("rslora", 8): 1e-3,
    ("pissa", 8): 3e-4,
    ("dora", 8): 1e-3,
    ("loraga", 8): 3e-4,
    ("full", None): 3e-5,
    ("inilora", 8): 1e-3,
    ("milora", 8): 1e-3,
}
MINILM_SWEEP = {
    ("lorasb", 16): 1e-2,
    ("lora-xs", 16): 1e-2,
    ("lora", 8): 3e-3,
    ("lora-pro", 8): 3e-3,
    ("head", None): 3e-2,
    ("full", None): 3e-4,
}


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def split_files(spec: dict) -> dict[str, str]:
    """train / test JSONL files, drawn once with seed 0."""
    folder = OUT / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {part: folder / f"{spec['data']}-{part}-{spec[f'{part}_rows']}.jsonl" for part in ("train", "test")}
    for part, path in paths.items():
        if not path.is_file():
            rows = data.load_dataset_rows(spec["data"], part, size=spec[f"{part}_rows"], seed=0).rows
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {part: str(p) for part, p in paths.items()}


def grid_name(spec: dict) -> str:
    """The folder of a spec's cells and sweeps: the model's, or the spec's own where its budget differs (a cell's
    key holds its method, rank, lr and seed, not its steps)."""
    return spec.get("grid", spec["model"])


def settings(spec: dict) -> GridSettings:
    files = split_files(spec)
    return GridSettings(
        model=spec["model"],
        data=files["train"],
        eval_data=files["test"],
        task=spec["task"],
        max_steps=spec["steps"],
        batch_size=spec["batch_size"],
        max_length=spec["max_length"],
        targets=spec["targets"],
        max_new_tokens=spec["max_new_tokens"],
        metric=spec.get("metric"),
        score_steps=spec.get("score_steps"),
    )


def sweep(spec: dict, families: dict, wanted: set[str], run: bool) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """The lr of each wanted family by compare's validation-loss sweep, and its points; without `run`, the
    sweeps as far as they were run (a family without points is left out)."""
    folder = OUT / f"{grid_name(spec)}-sweep"
    pairs = [pair for pair in families if pair[0] in wanted]
    if run:
        log(f"{folder.name}: {', '.join(m for m, _ in pairs)}")
        centre = {m: lr for (m, _), lr in families.items()}
        chosen, points = compare.sweep_lrs(folder, settings(spec), pairs, centre.__getitem__)
        return {m: chosen(m) for m, _ in pairs}, points
    points: dict[str, list[dict]] = {}
    for path in sorted((folder / "points").glob("*/point.json")):
        record = json.loads(path.read_text())
        if (record["cell"]["method"], record["cell"]["rank"]) in pairs:  # its swept rank, not another one
            points.setdefault(record["cell"]["method"], []).append({"lr": record["cell"]["lr"], "loss": record["loss"]})
    points = {m: sorted(p, key=lambda point: point["lr"]) for m, p in points.items()}
    return {m: min(p, key=lambda point: point["loss"])["lr"] for m, p in points.items()}, points


def _grid(folder: Path, setup: GridSettings, cells: list[Cell], run: bool) -> list[compare.CellResult]:
    """Run the grid (when `run`) and return its finished cells."""
    if run:
        log(f"{folder.name}: {len(cells)} cells")
        with console.progress_bar(folder.name) as progress:
            return compare.run_grid(folder, setup, cells, progress)
    finished = [folder / "cells" / c.key / "cell.json" for c in cells]
    return [compare.CellResult(**json.loads(p.read_text())) for p in finished if p.is_file()]


def seeded(pairs: list[tuple[str, int | None]], lrs: dict[str, float]) -> list[Cell]:
    """Seed-major, so that an interrupted grid has every method at its first seeds."""
    return [Cell(method=m, rank=r, seed=s, lr=lrs[m]) for s in range(SEEDS) for m, r in pairs if m in lrs]


def compares(rows: list[dict] | None) -> bool:
    """Whether a section's rows are a table yet: rows of one method and rank so far (the cell it shares with another
    section, or one curve's steps) compare nothing."""
    return len({(row["method"], row["rank"]) for row in rows or ()}) > 1


def section(
    name: str, spec: dict, cells: list[Cell], sweeps: dict, run: bool, rescored: bool = False
) -> list[dict] | None:
    """Run one section's cells on the test split, in the model's one grid folder (so a cell that two sections
    share, such as LoRA-SB r 32 at η 1e-5, runs once); write the section's report and PNGs. A `rescored` section
    reads another section's cells by another metric, so its loss curves would repeat that section's."""
    setup = settings(spec)
    results = _grid(OUT / grid_name(spec), setup, cells, run)
    if not results:
        return None
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    compare.write_report(folder, setup, results, title=name, sweeps=sweeps or None)
    if setup.score_steps:  # a learning curve: its rows are the scored steps'
        rows = compare.curve_rows(results, get_task(setup.task), setup.metric)
        shown = ("curve.png", "loss.png") if compares(rows) else ()
    else:
        rows = compare.aggregate(results, get_task(setup.task), setup.metric)
        shown = (("metric.png",) if rescored else ("loss.png", "metric.png")) if compares(rows) else ()
    if len(rows) < recorded_rows(name):  # RESULTS.md holds more of it than this machine's cells: keep that
        return None
    FIGURES.mkdir(parents=True, exist_ok=True)
    for png in shown + (("sweep.png",) if sweeps else ()):
        shutil.copyfile(folder / png, FIGURES / f"{name}-{png}")
    return rows


SMOLLM2_PAIRS = [("lorasb", 32), ("lora-xs", 32), ("lora", 8), ("lora-pro", 8)]
# r 16 first: it is the paper's ≥ 20× point and needs no sweep of its own; its table repeats two finished cells
SMOLLM2_R16 = [("lorasb", 16), ("lora-xs", 16), ("lora", 8), ("lorasb", 32)]
SMOLLM2_R64 = [("lorasb", 64), ("lora-xs", 64), ("lora", 8), ("lorasb", 32)]
# The same two families swept again at r 64: at one Adam lr a step of R moves W by about lr·r in Frobenius norm
# (R's r² entries each move by about lr; B and A are orthonormal), so the r 32 rate may be too large there
SMOLLM2_R64_SWEPT = [("lorasb", 64), ("lora-xs", 64), ("lora", 8)]
SMOLLM2_R64_SWEEP = {("lorasb", 64): 1e-3, ("lora-xs", 64): 3e-4, ("lora", 8): SMOLLM2_SWEEP[("lora", 8)]}
# LoRA-GA first: of the families left it is the other gradient-based init; rsLoRA last, as at r 8 it is LoRA's
# parametrisation with a larger scale
SMOLLM2_MORE = [(m, 8) for m in ("loraga", "pissa", "dora")] + [("full", None), ("rslora", 8)]
MINILM_PAIRS = [("lorasb", r) for r in (8, 16, 24)] + [("lora-xs", r) for r in (8, 16, 24)]
MINILM_PAIRS += [("lora", 8), ("lora-pro", 8), ("head", None), ("full", None)]


# `--lr auto` (issue 31) beside each family's swept rate: (method, rank) -> the sweep that rate comes from, in the
# order they run (LoRA-SB at the main rank and LoRA first: the comparison users make)
LR_AUTO_SMOLLM2 = {
    ("lorasb", 32): SMOLLM2_SWEEP,
    ("lora", 8): SMOLLM2_SWEEP,
    ("lora-xs", 32): SMOLLM2_SWEEP,
    ("lorasb", 16): SMOLLM2_SWEEP,
    ("lorasb", 64): SMOLLM2_R64_SWEEP,
}
LR_AUTO_MINILM = {("lorasb", 16): MINILM_SWEEP, ("lora", 8): MINILM_SWEEP, ("lora-xs", 16): MINILM_SWEEP}


def auto_cell(method: str, rank: int | None, seed: int) -> Cell:
    return Cell(method, rank, seed, "auto", label=f"{method} lr auto")


def lr_auto_section(name: str, spec: dict, families: dict, run: bool) -> tuple[list[dict] | None, dict]:
    """Each (method, rank) at its family's swept lr (the cell other sections ran, when they did) and with `--lr
    auto`, 3 seeds each, a pair at a time (its sweep, then its cells), so an interrupted section leaves whole pairs;
    returns the rows and, per pair, the swept rate beside the rates auto picked and its cost."""
    swept: dict[tuple[str, int | None], float] = {}
    rows = None
    for done, ((method, rank), sweeps) in enumerate(families.items(), start=1):
        found = sweep(spec, sweeps, {method}, run)[0]
        if method in found:
            swept[(method, rank)] = found[method]
        if run or done == len(families):
            pairs = list(families)[:done]
            cells = [Cell(m, r, s, lr) for s in range(SEEDS) for (m, r), lr in swept.items() if (m, r) in pairs]
            cells += [auto_cell(m, r, s) for s in range(SEEDS) for m, r in pairs]
            rows = section(name, spec, cells, {}, run)
    return rows, lr_auto_rates(spec, swept, families)


def lr_auto_rates(spec: dict, swept: dict, families: dict) -> dict[str, str]:
    """Per pair of `families` (as lr_auto_section's): the swept lr (and the rank swept, where the family's rate
    comes from another), the lr the range test picked at each finished seed, and the test's seconds against a run's
    (training only) and a 5-point sweep's (5 runs)."""
    grid = OUT / spec["model"] / "cells"
    rates = {}
    for (method, rank), sweeps in families.items():
        folders = [grid / auto_cell(method, rank, s).key for s in range(SEEDS)]
        done = [f for f in folders if (f / "cell.json").is_file()]
        if not done:
            continue
        curves = [json.loads((f / "run" / lr_range.CURVE_FILE).read_text()) for f in done]
        test = sum(c["seconds"] for c in curves) / len(curves)
        train = sum(json.loads((f / "cell.json").read_text())["seconds"] for f in done) / len(done)
        picked = "/".join(f"{c['lr']:.2g}" for c in curves)
        cost = f"range test {test:.0f} s, a run {train:.0f} s: {test / (5 * train):.0%} of a 5-point sweep"
        at = ""
        if (method, rank) in swept:
            swept_rank = next(r for m, r in sweeps if m == method)
            at = f"swept{'' if swept_rank == rank else f' at r{swept_rank}'} {swept[(method, rank)]:.3g}, "
        rates[f"{method} r{rank}"] = f"{at}auto {picked} ({cost})"
    return rates


# Issue 32: does the budget decide it? One run per seed of 400 steps (5% warm-up, linear decay to 400), scored at
# steps 40, 150 and 400; its own grid, as a cell's key does not hold its step count.
SMOLLM2_CURVE = SMOLLM2 | {"steps": 400, "score_steps": "40,150", "grid": "smollm2-135m-400"}
CURVE_PAIRS = [("lorasb", 32), ("lora", 8), ("lora-xs", 32)]


def curve_section(run: bool) -> tuple[list[dict] | None, dict]:
    """LoRA-SB r 32, LoRA r 8 and LoRA-XS r 32 at their 40-step swept rates, 3 seeds, scored along 400 steps. A
    family whose 40-step rate lies at an edge of its sweep (the sweep stopped extending at SWEEP_MAX points) is
    swept again at 400 steps around it. The section's wall time (its cells, their scoring and any sweep run here)
    adds up in seconds.json."""
    started = time.perf_counter()
    lrs, points = sweep(SMOLLM2, SMOLLM2_SWEEP, {m for m, _ in CURVE_PAIRS}, run)
    edge = {m for m, p in points.items() if lrs[m] in (p[0]["lr"], p[-1]["lr"])}
    if edge:
        again = {(m, r): lrs[m] for m, r in CURVE_PAIRS if m in edge}
        found, swept = sweep(SMOLLM2_CURVE, again, edge, run)
        lrs, points = lrs | found, points | swept
    rows = section("smollm2-curve", SMOLLM2_CURVE, seeded(CURVE_PAIRS, lrs), points, run)
    cost = OUT / "smollm2-curve" / "seconds.json"
    if run:
        cost.parent.mkdir(parents=True, exist_ok=True)
        spent = json.loads(cost.read_text()) if cost.is_file() else 0.0
        cost.write_text(json.dumps(spent + time.perf_counter() - started))
    return rows, lrs


def curve_note(rows: list[dict]) -> str:
    """What the curve section's table does not show: trainable parameters and their ratio, and its cost."""
    trainable = {f"{r['method']} r{r['rank']}": r["trainable_params"] for r in rows}
    fewest = min(trainable.values())
    counts = ", ".join(f"{k} {v:,} ({v / fewest:.1f}×)" for k, v in trainable.items())
    cost, last = OUT / "smollm2-curve" / "seconds.json", max(r["step"] for r in rows)
    cells = sum(r["seeds"] for r in rows if r["step"] == last)
    spent = (
        f" Cost of its {cells} cells on this machine: {json.loads(cost.read_text()) / 3600:.1f} h."
        if cost.is_file()
        else ""
    )
    steps, scored = SMOLLM2_CURVE["steps"], SMOLLM2_CURVE["score_steps"].replace(",", ", ")
    first = SMOLLM2_CURVE["score_steps"].split(",")[0]
    return (
        f"Trainable parameters: {counts}. Each seed is one {steps}-step run whose checkpoints at steps {scored} are "
        f"scored, so its step-{first} point is at a still high lr (linear decay to step {steps}), unlike the "
        f"{SMOLLM2['steps']}-step tables above, whose runs decay to 0 by their last step.{spent}"
    )


def authors_eta(lr: float, spec: dict) -> float:
    """The LoRA-SB authors' η: lr / (warm-up ratio × optimizer steps × epochs), as their code computes it."""
    return lr / (GridSettings.warmup_ratio * spec["steps"] * 1)


def eta_cells(rank: int, lr: float, spec: dict) -> list[Cell]:
    """LoRA-SB at the default η 1e-5 (the main section's cell), the authors' rule and `--init-scale auto`."""
    eta = authors_eta(lr, spec)
    cells = []
    for s in range(SEEDS):
        cells.append(Cell("lorasb", rank, s, lr))
        cells.append(Cell("lorasb", rank, s, lr, label=f"lorasb η={eta:.3g} (authors')", eta=eta))
        cells.append(Cell("lorasb", rank, s, lr, label="lorasb auto", options={"init_scale": "auto"}))
    return cells


def budgeted_cells(rank: int, lr: float) -> list[Cell]:
    """LoRA-SB at `rank` everywhere against the same count spent per module (decompose --budget-ratio 1)."""
    cells = []
    for s in range(SEEDS):
        cells.append(Cell("lorasb", rank, s, lr))
        cells.append(Cell("lorasb", rank, s, lr, label="lorasb budgeted", options={"budget_ratio": 1.0}))
    return cells


def family_by_family(
    name: str, pairs: list[tuple[str, int | None]], families: dict, run: bool
) -> tuple[list[dict] | None, dict]:
    """One SmolLM2 section a family at a time: its sweep (instant when already run), then its cells at every seed,
    so an interrupted section leaves whole families, each at its own lr, rather than sweeps without cells."""
    lrs: dict[str, float] = {}
    points: dict[str, list[dict]] = {}
    rows = None
    for done in range(1, len(pairs) + 1):
        found, swept = sweep(SMOLLM2, families, {pairs[done - 1][0]}, run)
        lrs, points = lrs | found, points | swept
        if run or done == len(pairs):
            rows = section(name, SMOLLM2, seeded(pairs[:done], lrs), points, run)
    return rows, lrs


def smollm2_sections(sections: set[str], run: bool) -> dict[str, tuple[list[dict] | None, dict]]:
    tables: dict[str, tuple[list[dict] | None, dict]] = {}
    named = {
        "smollm2": (SMOLLM2_PAIRS, SMOLLM2_SWEEP),
        "smollm2-r16": (SMOLLM2_R16, SMOLLM2_SWEEP),
        "smollm2-r64": (SMOLLM2_R64, SMOLLM2_SWEEP),
        "smollm2-r64-swept": (SMOLLM2_R64_SWEPT, SMOLLM2_R64_SWEEP),
        "smollm2-more": (SMOLLM2_MORE, SMOLLM2_SWEEP),
    }
    for name, (pairs, families) in named.items():
        if name in sections:
            tables[name] = family_by_family(name, pairs, families, run)
    ablations = {"eta", "budget", "inits", "samples"}  # at LoRA-SB's lr
    lr = sweep(SMOLLM2, SMOLLM2_SWEEP, {"lorasb"}, run)[0].get("lorasb") if sections & ablations else None
    if "eta" in sections and lr:
        tables["eta"] = (section("eta", SMOLLM2, eta_cells(32, lr, SMOLLM2), {}, run), {"all": lr})
    if "budget" in sections and lr:
        tables["budget"] = (section("budget", SMOLLM2, budgeted_cells(32, lr), {}, run), {"all": lr})
    if "inits" in sections and lr:
        cells = [Cell("lorasb", 32, s, lr) for s in range(SEEDS)]
        cells += [Cell(init, 32, s, lr) for init in ("kaiming", "non-orthonormal") for s in range(SEEDS)]
        cells += [
            Cell("noisy", 32, s, lr, label=f"noisy σ={sigma:g}", options={"noise_std": sigma})
            for sigma in (1.0, 10.0)
            for s in range(SEEDS)
        ]
        tables["inits"] = (section("inits", SMOLLM2, cells, {}, run), {"all": lr})
    if "samples" in sections and lr:
        cells = [
            Cell("lorasb", 32, s, lr, label=f"lorasb n={n}", samples=n) for n in (1, 4, 16, 64) for s in range(SEEDS)
        ]
        cells += [Cell("lorasb", 32, s, lr) for s in range(SEEDS)]  # n = 32
        tables["samples"] = (section("samples", SMOLLM2, cells, {}, run), {"all": lr})
    if "inilora" in sections:
        pairs = [(m, 8) for m in ("inilora", "milora", "pissa", "lora")]
        lrs, points = sweep(SMOLLM2, SMOLLM2_SWEEP, {m for m, _ in pairs}, run)
        if "inilora" in lrs:
            lrs["inilora-alpha"] = lrs["inilora-beta"] = lrs["inilora"]
        pairs += [("inilora-alpha", 8), ("inilora-beta", 8)]
        # until IniLoRA or MiLoRA has a rate, the section's only cells are the PiSSA and LoRA baselines that
        # smollm2-more and smollm2 already show: not yet a comparison
        ran = {"inilora", "milora"} & lrs.keys()
        tables["inilora"] = (section("inilora", SMOLLM2, seeded(pairs, lrs), points, run) if ran else None, lrs)
    return tables


def build(sections: set[str], run: bool) -> dict[str, tuple[list[dict] | None, dict]]:
    tables: dict[str, tuple[list[dict] | None, dict]] = {}
    if sections & {"minilm", "minilm-f1", "minilm-head", "minilm-budget", "minilm-eta"}:
        wanted = {m for m, _ in MINILM_PAIRS} if sections & {"minilm", "minilm-f1", "minilm-head"} else {"lorasb"}
        lrs, points = sweep(MINILM, MINILM_SWEEP, wanted, run)
        if "minilm" in sections:
            tables["minilm"] = (section("minilm", MINILM, seeded(MINILM_PAIRS, lrs), points, run), lrs)
        if "minilm-f1" in sections:  # the minilm cells, scored again
            scored = MINILM | {"metric": "f1_macro"}
            tables["minilm-f1"] = (section("minilm-f1", scored, seeded(MINILM_PAIRS, lrs), {}, run, rescored=True), lrs)
        if "minilm-head" in sections and {"lorasb", "lora", "head"} <= lrs.keys():
            cells = [
                Cell("head", None, s, lrs[m], label=f"head at {m} lr" if m != "head" else "")
                for s in range(SEEDS)
                for m in ("head", "lorasb", "lora")
            ]
            tables["minilm-head"] = (section("minilm-head", MINILM, cells, {}, run), lrs)
        if "minilm-budget" in sections and "lorasb" in lrs:
            cells = budgeted_cells(16, lrs["lorasb"])
            tables["minilm-budget"] = (section("minilm-budget", MINILM, cells, {}, run), {"all": lrs["lorasb"]})
        if "minilm-eta" in sections and "lorasb" in lrs:
            cells = eta_cells(16, lrs["lorasb"], MINILM)
            tables["minilm-eta"] = (section("minilm-eta", MINILM, cells, {}, run), {"all": lrs["lorasb"]})
    if "minilm-lr-auto" in sections:
        tables["minilm-lr-auto"] = lr_auto_section("minilm-lr-auto", MINILM, LR_AUTO_MINILM, run)
    if "lr-auto" in sections:
        tables["lr-auto"] = lr_auto_section("lr-auto", SMOLLM2, LR_AUTO_SMOLLM2, run)
    if "smollm2-curve" in sections:
        tables["smollm2-curve"] = curve_section(run)
    return tables | smollm2_sections(sections, run)


# The sections in the order RESULTS.md shows them
TITLES = {
    "minilm": "MiniLM-L6 on reuters-r8 (paper Table 3's shape): accuracy",
    "minilm-f1": "MiniLM-L6 on reuters-r8: the same cells by macro-F1 over the 8 topics",
    "minilm-head": "MiniLM-L6: the head alone at its own lr and at LoRA-SB's and LoRA's (each method trains the "
    "head at its lr)",
    "minilm-budget": "MiniLM-L6: budgeted ranks at the count of r = 16 (decompose --budget-ratio 1) against r = 16",
    "minilm-eta": "MiniLM-L6: η of the simulated first step at r = 16: default, the authors' rule, auto",
    "minilm-lr-auto": "MiniLM-L6: `train --lr auto` (a range test on a held-out slice) against each family's swept lr",
    "smollm2": "SmolLM2-135M on arithmetic (paper Tables 1–2's shape): exact match and response loss",
    "smollm2-r16": "SmolLM2-135M at r = 16: LoRA-SB and LoRA-XS at 45× fewer parameters than LoRA r = 8",
    "smollm2-r64": "SmolLM2-135M at r = 64: LoRA-SB and LoRA-XS at 2.8× fewer parameters than LoRA r = 8",
    "smollm2-r64-swept": "SmolLM2-135M at r = 64: LoRA-SB and LoRA-XS each at its own lr swept at r = 64",
    "smollm2-more": "SmolLM2-135M on arithmetic: the rest of the grid",
    "eta": "η of the simulated first step at r = 32: default, the authors' rule, auto (the `lorasb` row is η = 1e-5)",
    "budget": "Budgeted ranks at the count of r = 32 (decompose --budget-ratio 1) against r = 32 everywhere",
    "lr-auto": "SmolLM2-135M: `train --lr auto` against each family's swept lr",
    "smollm2-curve": "SmolLM2-135M: the learning curve of LoRA-SB r = 32, LoRA r = 8 and LoRA-XS r = 32 over 400 steps",
    "inits": "Ablation: initialization at r = 32 (paper Table 4, Appendix E)",
    "samples": "Ablation: estimate sample count at r = 32 (paper Table 5; the `lorasb` row is n = 32)",
    "inilora": "IniLoRA's comparison at r = 8",
}
LR_AUTO_SECTIONS = ("minilm-lr-auto", "lr-auto")
# The order a full run takes: the budgeted ranks (issue 17) first, as they need one sweep per model, then the grid,
# each claim's cheapest answer first (SmolLM2's r 16, η and r 64 cells reuse finished sweeps; the rest need their own).
DEFAULT_SECTIONS = ("minilm-budget", "budget", "minilm", "minilm-f1", "minilm-head", "minilm-eta", "smollm2-r16")
DEFAULT_SECTIONS += ("eta", "smollm2", "smollm2-r64", "smollm2-r64-swept", "smollm2-more", *LR_AUTO_SECTIONS)
DEFAULT_SECTIONS += ("smollm2-curve",)


BUDGET_NOTE = (
    "How the budget was chosen (measured on this 2-core machine before the grid, 2026-12-01): a SmolLM2 LoRA-SB run "
    "of 20 steps of 8 × ≤ 64 tokens took 60 s to train and 60 s to score 300 test rows (greedy, 6 new tokens); an "
    "estimate of 32 samples 25 s. Test sets are 300 rows (binomial std of an accuracy near 0.3: 0.026). Sequences are"
    " cut to 64 tokens, which holds every `arithmetic` row. At 40 steps a SmolLM2 sweep point took 4 to 5 minutes "
    "and a cell 4 to 9 (with its estimate and the generation), a MiniLM cell or sweep point about 1, so the whole "
    "grid (about 95 SmolLM2 and 55 MiniLM runs with the sweeps) takes 6 to 8 hours here, not 2: the sections run in "
    "the order given (budgeted ranks first, then MiniLM with LoRA-Pro and the η rules, which answer every claim for "
    "about 45 minutes, then SmolLM2's LoRA-SB / LoRA-XS / LoRA, its r 16 and η cells, LoRA-Pro (its own sweep, 6 to 9"
    " minutes a cell with its full-size moments), then the rest), every run is resumable, and a table below holds "
    "only the cells that finished (its `seeds` column says how many)."
)


def recorded_rows(name: str) -> int:
    """How many table rows RESULTS.md records for section `name` (0 where it has none)."""
    text = recorded_sections().get(TITLES[name], "")
    return max(0, sum(line.startswith("| ") for line in text.splitlines()) - 1)  # less the header


def recorded_sections() -> dict[str, str]:
    """The sections RESULTS.md holds now, by title: a section whose cells are not on this machine (another machine or
    session ran it; benchmarks/out/ is not committed) keeps its recorded table and figures instead of vanishing."""
    text = RESULTS_PATH.read_text() if RESULTS_PATH.is_file() else ""
    begin, end = "<!-- quality:begin -->", "<!-- quality:end -->"
    if begin not in text or end not in text:
        return {}
    block = text.split(begin, 1)[1].split(end, 1)[0]
    sections = {}
    for part in block.split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        body = body.split("\nNot run yet")[0].split("\nRun time of this invocation")[0]
        sections[title] = f"## {title}\n{body}".rstrip()
    return sections


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
            "final number) and by the per-sample mean response loss on them. MiniLM-L6: "
            f"{MINILM['steps']} steps of batch {MINILM['batch_size']} on {MINILM['train_rows']} `reuters-r8` rows, "
            f"accuracy on {MINILM['test_rows']} test rows. Estimates: 32 samples, η 1e-5, one per seed. "
            f"Every cell: {SEEDS} seeds (0, 1, 2), linear schedule, 5% warm-up, AdamW without weight decay. Each "
            "family's lr is the lowest validation loss of its sweep (seed 0, the swept rank, 200 rows held out of the "
            "training rows; every point in the section's results.json, the sweep plot below); the family's other "
            "ranks and the ablations reuse it. Step-0 and eval losses are the same per-sample mean on the test rows "
            "in every cell; `auto` chooses its scale on its own probe slice of the training rows."
        ),
        "",
        BUDGET_NOTE,
        "",
    ]
    recorded = recorded_sections()
    unfinished = [n for n in TITLES if not compares(tables.get(n, (None,))[0]) and TITLES[n] not in recorded]
    for name, title in TITLES.items():  # the report's order
        rows, lrs = tables.get(name, (None, {}))
        if not compares(rows):
            lines += [recorded[title], ""] if title in recorded else []
            continue
        table = compare.curve_table(rows) if name == "smollm2-curve" else compare.markdown_table(rows)
        lines += [f"## {title}", "", table]
        if name == "smollm2-curve":
            lines.append(curve_note(rows))
        if name in LR_AUTO_SECTIONS:
            picked = "; ".join(f"{k}: {v}" for k, v in lrs.items())
            lines.append(
                f"Learning rates, swept and picked by `--lr auto` (seeds 0, 1, 2): {picked}. The column 'vs best' "
                "ranks every row against the section's best; read each `lr auto` row against its family's swept row."
            )
        else:
            lines.append(f"Learning rates (from the sweep): {', '.join(f'{k} {v:.3g}' for k, v in lrs.items())}.")
        lines.append("")
        for png, what in (
            ("curve", "metric and eval loss by step"),
            ("loss", "loss curves"),
            ("metric", "metric vs trainable parameters"),
            ("sweep", "lr sweeps"),
        ):
            if (FIGURES / f"{name}-{png}.png").is_file():
                lines += [f"![{name} {what}](results/quality/{name}-{png}.png)", ""]
    if unfinished:
        lines += [f"Not run yet (or one row so far): {', '.join(unfinished)}.", ""]
        for name in unfinished:  # the lr sweeps of a section run before its cells
            if (FIGURES / f"{name}-sweep.png").is_file():
                lines += [f"![{name} lr sweeps so far](results/quality/{name}-sweep.png)", ""]
    lines.append(f"Run time of this invocation: {seconds / 60:.1f} min.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=f"comma list of {list(TITLES)}")
    parser.add_argument("--report", action="store_true", help="rebuild the report from finished cells only")
    args = parser.parse_args()
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - set(TITLES)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(TITLES)}")
    console.setup_logging(debug=False, quiet=False)
    start = time.perf_counter()
    if not args.report:
        for name in dict.fromkeys(s.strip() for s in args.only.split(",") if s.strip()):  # in the order given
            build({name}, run=True)
    tables = build(set(TITLES), run=False)  # every finished section, run now or before
    text = report(tables, time.perf_counter() - start)
    write_section(RESULTS_PATH, "quality", text)
    print(text)


if __name__ == "__main__":
    main()
