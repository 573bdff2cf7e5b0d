"""A compare grid's report: `results.md` (metric mean ± std over seeds, ranked as the task declares, trainable
parameters, train time, peak memory), `results.json`, `loss.png` (mean train loss per step), `metric.png` (metric
against trainable parameters, log axis), with --score-steps the learning curve (`curve.png`) and, after an lr
sweep, `sweep.png`."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from .. import files
from ..configs import GridSettings
from ..errors import BadInputError
from ..tasks import Task, get_task
from .cells import Cell, CellResult, lr_text


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: Sequence[CellResult], task: Task, metric: str | None = None) -> list[dict]:
    """One row per (label, rank): mean ± std over seeds of `metric` (default: the task's primary metric) and eval
    loss, and the costs; marked against the best row in the direction the task declares for the metric."""
    groups: dict[tuple[str, int | None], list[CellResult]] = {}
    for result in results:
        cell = Cell.from_record(result.cell)
        groups.setdefault((cell.name, cell.rank), []).append(result)
    rows = []
    for (name, rank), group in groups.items():
        name_of = metric or task.metric
        if name_of not in group[0].metrics:
            raise BadInputError(f"--metric {name_of}: the task reports {', '.join(group[0].metrics)}")
        value, spread = _mean_std([float(r.metrics[name_of]) for r in group])
        losses = [r.eval_loss for r in group if r.eval_loss is not None]
        rows.append(
            {
                "method": name,
                "rank": rank,
                "seeds": len(group),
                "metric": name_of,
                "mean": value,
                "std": spread,
                "eval_loss": _mean_std(losses) if losses else None,
                "step0_loss": statistics.fmean(r.step0_init_loss for r in group if r.step0_init_loss is not None)
                if any(r.step0_init_loss is not None for r in group)
                else None,
                "trainable_params": group[0].trainable_params,
                "lr": group[0].cell["lr"],
                "seconds": statistics.fmean(r.seconds for r in group),
                "peak_memory_bytes": max(r.peak_memory_bytes for r in group),
            }
        )
    return mark_noise(rows, higher_is_better=task.higher_is_better(metric))


def curve_rows(results: Sequence[CellResult], task: Task, metric: str | None = None) -> list[dict]:
    """`aggregate`'s rows at each step the cells were scored at (--score-steps, and the last), each with its
    `step` and marked against the best row of that step; empty without a curve."""
    steps = sorted({point["step"] for result in results for point in result.curve})
    rows = []
    for step in steps:
        at = [
            replace(result, metrics=point["metrics"], eval_loss=point["eval_loss"])
            for result in results
            for point in result.curve
            if point["step"] == step
        ]
        rows += [row | {"step": step} for row in aggregate(at, task, metric)]
    return rows


def mark_noise(rows: list[dict], *, higher_is_better: bool) -> list[dict]:
    """Each row's `vs_best`: "best" (the highest mean, or the lowest where lower is better), "within noise" when
    its mean ± std over seeds overlaps the best row's, or "below". With one seed there is no spread to judge by:
    "n/a"."""
    if not rows:
        return rows
    best = (max if higher_is_better else min)(rows, key=lambda r: r["mean"])
    for row in rows:
        if row is best:
            row["vs_best"] = "best"
        elif row["seeds"] < 2 or best["seeds"] < 2:
            row["vs_best"] = "n/a"
        else:
            overlap = abs(row["mean"] - best["mean"]) <= row["std"] + best["std"]
            row["vs_best"] = "within noise" if overlap else "below"
    return rows


def _base_line(base: dict | None, rows: list[dict]) -> str:
    """The base model's score in the table's metric, and the template both were prompted with."""
    if base is None or not rows or not isinstance(base["metrics"].get(rows[0]["metric"]), (int, float)):
        return ""
    metric = rows[0]["metric"]
    return (
        f"Before training, the base model scores {metric} {base['metrics'][metric]:.4f}, prompted as every adapter "
        f"below is (template `{base['template']}`).\n\n"
    )


def markdown_table(rows: Sequence[dict]) -> str:
    from ..console import human_bytes

    header = (
        "| method | rank | trainable | lr | {metric} (mean ± std) | vs best | eval loss | step-0 loss | seeds | "
        "train s | peak mem |"
    )
    lines = [header.format(metric=rows[0]["metric"] if rows else "metric"), "|" + "---|" * 11]
    for row in rows:
        loss = f"{row['eval_loss'][0]:.4f} ± {row['eval_loss'][1]:.4f}" if row["eval_loss"] else "-"
        step0 = f"{row['step0_loss']:.4f}" if row["step0_loss"] is not None else "-"
        lines.append(
            f"| {row['method']} | {row['rank'] if row['rank'] is not None else '-'} | {row['trainable_params']:,} | "
            f"{lr_text(row['lr'])} | {row['mean']:.4f} ± {row['std']:.4f} | {row['vs_best']} | {loss} | {step0} | "
            f"{row['seeds']} | "
            f"{row['seconds']:.0f} | {human_bytes(row['peak_memory_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def curve_table(rows: Sequence[dict]) -> str:
    """The learning curve: each (method, rank) at each scored step, against the best row of its step."""
    lines = [
        f"| method | rank | step | {rows[0]['metric']} (mean ± std) | vs best at the step | eval loss | seeds |",
        "|" + "---|" * 7,
    ]
    order = list(dict.fromkeys((r["method"], r["rank"]) for r in rows))  # the grid's order, each line by step
    for row in sorted(rows, key=lambda r: (order.index((r["method"], r["rank"])), r["step"])):
        loss = f"{row['eval_loss'][0]:.4f} ± {row['eval_loss'][1]:.4f}" if row["eval_loss"] else "-"
        lines.append(
            f"| {row['method']} | {row['rank'] if row['rank'] is not None else '-'} | {row['step']} | "
            f"{row['mean']:.4f} ± {row['std']:.4f} | {row['vs_best']} | {loss} | {row['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def plot_curve(rows: Sequence[dict], path: Path, title: str) -> None:
    """The metric and the eval loss against the step, mean ± std over seeds, one line per (method, rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict]] = {}
    for row in rows:
        lines.setdefault(row["method"] + (f" r={row['rank']}" if row["rank"] is not None else ""), []).append(row)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    for label, points in lines.items():
        points = sorted(points, key=lambda r: r["step"])
        steps = [p["step"] for p in points]
        left.errorbar(steps, [p["mean"] for p in points], yerr=[p["std"] for p in points], label=label, capsize=3)
        if all(p["eval_loss"] for p in points):
            losses = [p["eval_loss"] for p in points]
            right.errorbar(steps, [m for m, _ in losses], yerr=[s for _, s in losses], label=label, capsize=3)
    left.set(xlabel="step", ylabel=rows[0]["metric"], title=f"{title}: {rows[0]['metric']} by step")
    right.set(xlabel="step", ylabel="eval loss (response, per sample)", title=f"{title}: eval loss by step")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    files.write_figure(fig, path)


def plot(results: Sequence[CellResult], rows: Sequence[dict], out: Path, title: str) -> list[Path]:
    """`loss.png`: mean train loss per step of each (method, rank); `metric.png`: metric vs trainable params."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, dict[int, list[float]]] = {}
    for result in results:
        cell = Cell.from_record(result.cell)
        label = cell.name + (f" r={cell.rank}" if cell.rank is not None else "")
        for point in result.loss:
            curves.setdefault(label, {}).setdefault(point["step"], []).append(point["loss"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for label, by_step in curves.items():
        steps = sorted(by_step)
        ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], label=label, lw=1.2)
    ax.set(xlabel="step", ylabel="train loss (mean over seeds)", title=f"{title}: loss curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    paths = [out / "loss.png", out / "metric.png"]
    files.write_figure(fig, paths[0])

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for row in rows:
        ax.errorbar(row["trainable_params"], row["mean"], yerr=row["std"], fmt="o", capsize=3)
        ax.annotate(
            f"{row['method']}" + (f" r={row['rank']}" if row["rank"] is not None else ""),
            (row["trainable_params"], row["mean"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set(
        xlabel="trainable parameters (log)",
        ylabel=rows[0]["metric"] if rows else "metric",
        title=f"{title}: metric vs trainable parameters",
    )
    ax.grid(alpha=0.3, which="both")
    files.write_figure(fig, paths[1])
    return paths


def write_report(
    out: str | Path,
    settings: GridSettings,
    results: Sequence[CellResult],
    title: str = "lorasb compare",
    sweeps: dict[str, list[dict]] | None = None,
    base: dict | None = None,
) -> Path:
    """results.md, results.json and the PNGs in `out` (sweep.png with `sweeps`); returns the markdown path. `base`:
    the untrained base model's results (score_base), reported above the table."""
    out = Path(out)
    task = get_task(settings.task)
    rows, curve = aggregate(results, task, settings.metric), curve_rows(results, task, settings.metric)
    plot(results, rows, out, title)
    with files.atomic_path(out / "results.json") as tmp:
        payload = {"settings": asdict(settings), "rows": rows, "cells": [asdict(r) for r in results], "base": base}
        payload |= ({"lr_sweep": sweeps} if sweeps else {}) | ({"curve": curve} if curve else {})
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    text = (
        f"# {title}\n\nModel `{settings.model}`, task `{settings.task}`, {settings.max_steps} steps of batch "
        f"{settings.batch_size}, estimate over {settings.samples} samples at η {settings.eta:g}.\n\n"
        + _base_line(base, rows)
        + markdown_table(rows)
        + "\n![loss curves](loss.png)\n\n![metric vs trainable parameters](metric.png)\n"
    )
    if curve:
        plot_curve(curve, out / "curve.png", title)
        text += "\n## Learning curve\n\n" + curve_table(curve) + "\n![learning curve](curve.png)\n"
    if sweeps:
        plot_sweeps(sweeps, out / "sweep.png", title)
        text += (
            "\nEach method's lr is the lowest validation loss of its sweep (seed 0, its first rank, a slice of the "
            "training rows; never the test rows); every point is in results.json.\n\n![lr sweeps](sweep.png)\n"
        )
    with files.atomic_path(out / "results.md") as tmp:
        tmp.write_text(text)
    return out / "results.md"


def plot_sweeps(sweeps: dict[str, list[dict]], path: Path, title: str) -> None:
    """Validation loss against lr (log axis), one line per method, its chosen lr marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, points in sweeps.items():
        line = ax.plot([p["lr"] for p in points], [p["loss"] for p in points], "o-", label=method, lw=1.2)[0]
        best = min(points, key=lambda p: p["loss"])
        ax.plot([best["lr"]], [best["loss"]], "*", ms=12, color=line.get_color())
    ax.set_xscale("log")
    ax.set(xlabel="learning rate (log)", ylabel="validation loss", title=f"{title}: lr sweeps (★ chosen)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    files.write_figure(fig, path)
