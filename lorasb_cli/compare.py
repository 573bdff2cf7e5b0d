"""`lorasb compare`: run a grid of methods × ranks × seeds on the same data, steps and evaluation, and report it.

Every cell is one `train` run and one `evaluate` of its adapter on the held-out data; a cell is done when its
`cell.json` exists, so an interrupted grid resumes where it stopped. One estimate per seed (and per η or sample
count, where an ablation changes them) is shared by every LoRA-SB-family cell of that seed. Writes
`results.md` (metric mean ± std over seeds, trainable parameters, train time, peak memory), `results.json`,
`loss.png` (mean train loss per step) and `metric.png` (metric against trainable parameters, log axis).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import artifacts, data, inits, methods, models
from .configs import COMPARE_MAX_LENGTH, CompareConfig, DecomposeConfig, EstimateConfig, TrainConfig
from .errors import BadInputError
from .options import takes
from .tasks import get_task

log = logging.getLogger("lorasb")


@dataclass(frozen=True)
class Cell:
    """One run: `method` is a train method or an init (which trains R with `--method lorasb`)."""

    method: str
    rank: int | None
    seed: int
    lr: float | str  # a number, or auto (train --lr auto)
    label: str = ""  # the row of the table; default: the method
    samples: int | None = None  # estimate sample count; default: Settings.samples
    eta: float | None = None  # estimate η; default: Settings.eta
    # The plug-ins' own options, by field name: the init's (noisy's noise_std), the method's (init_scale), and
    # decompose's budget (budget_ratio, ...: BUDGET_OPTIONS).
    options: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: dict) -> Cell:
        """A cell as cell.json holds it; reports written before `options` kept two plug-in options apart."""
        record = dict(record)
        legacy = {k: record.pop(k) for k in ("noise_std", "init_scale") if k in record}
        options = record.pop("options", {}) | {k: v for k, v in legacy.items() if v is not None}
        return cls(**record, options=options)

    def options_of(self, takes_option: Callable[[str], bool]) -> dict[str, object]:
        """The options one plug-in takes (`takes_option(name)`), of those the cell sets."""
        return {k: v for k, v in self.options.items() if takes_option(k)}

    @property
    def name(self) -> str:
        return self.label or self.method

    @property
    def key(self) -> str:
        """The cell's folder name: unique in a grid, stable across reruns."""
        rank = f"r{self.rank}" if self.rank is not None else "full"
        lr = lr_text(self.lr).replace("+", "")
        return f"{self.name}-{rank}-lr{lr}-s{self.seed}".replace("/", "_").replace(" ", "")

    @property
    def is_init(self) -> bool:
        return self.method in inits.INITS


@dataclass(frozen=True)
class Settings:
    """What every cell shares: model, data files, task and the training budget."""

    model: str
    train_data: str
    eval_data: str
    task: str
    max_steps: int = 100
    batch_size: int = 8
    max_length: int | None = None  # None: each stage's default, within the model (compare() sets COMPARE_MAX_LENGTH)
    targets: str = "all-linear"
    samples: int = 32
    eta: float = 1e-5
    warmup_ratio: float = 0.05
    eval_batch_size: int = 16
    max_new_tokens: int | None = None
    template: str = "auto"
    metric: str | None = None  # the metric the table ranks by [default: primary_metric]
    split: str = "train"
    data_config: str | None = None
    fields: str | None = None
    format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def model_options(self) -> dict:
        """The model group, as every cell's estimate, train and evaluate take it."""
        names = ("dtype", "device", "trust_remote_code", "allow_pickle")
        return {"model": self.model} | {name: getattr(self, name) for name in names}

    def data_options(self) -> dict:
        """How the training data is read, as every cell's estimate and train take it."""
        names = ("split", "data_config", "fields", "format", "template", "batch_size", "max_length")
        return {"data": self.train_data} | {name: getattr(self, name) for name in names}


@dataclass
class CompareSummary:
    path: Path
    cells: int
    rows: list[dict]


def compare(config: CompareConfig, progress: Callable[[int, int], None] | None = None) -> CompareSummary:
    """Run the grid `config` describes into `config.out` (finished cells are kept) and write its report."""
    try:
        ranks = [int(r) for r in config.ranks.split(",") if r.strip()]
    except ValueError:
        raise BadInputError(f"--ranks '{config.ranks}' must be a comma list of integers") from None
    pairs, lr = parse_methods(config.methods, ranks), parse_lrs(config.lr)
    if config.lr_sweep and any(lr(method) == "auto" for method, _ in pairs):
        raise BadInputError("--lr-sweep sweeps around a number; --lr auto picks the rate itself", hint="pass one")
    cells = grid(pairs, config.seeds, lr)  # checks the seeds and that every method has an lr
    task = get_task(config.task)
    if config.metric is not None and not task.has_metric(config.metric):  # before any cell runs
        raise BadInputError(
            f"--metric {config.metric}: task {task.name} reports {', '.join(task.metrics)}", hint="pick one of those"
        )
    out = Path(config.out)
    shared = {f.name: getattr(config, f.name) for f in fields(Settings) if hasattr(config, f.name)}
    max_length = models.fit_max_length(
        config.max_length,
        COMPARE_MAX_LENGTH,
        models.resolve_model(config.model),
        trust_remote_code=config.trust_remote_code,
    )
    named = {"train_data": config.data, "eval_data": config.eval_data or config.data, "max_length": max_length}
    check_cells(out, Settings(**shared | named), cells)  # before anything is written
    existed = out.exists()
    try:
        train_data, held_out = prepare_data(out, config.data, config.eval_data, config.size, config.eval_size)
        settings = Settings(**shared | named | {"train_data": train_data, "eval_data": held_out})
        sweeps = {}
        if config.lr_sweep:
            lr, sweeps = sweep_lrs(out / "sweep", settings, pairs, lr)
        results = run_grid(out, settings, grid(pairs, config.seeds, lr), progress)
        report = write_report(out, settings, results, sweeps=sweeps, base=score_base(out, settings, results))
    except BadInputError:
        # A grid refused before it finished a cell (bad rows, a rank past the model's) leaves no folder it made; a
        # finished cell is kept for the rerun to resume.
        if not existed and not any(out.glob("cells/*/cell.json")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    return CompareSummary(report, len(results), aggregate(results, config.metric))


@dataclass
class CellResult:
    cell: dict
    metrics: dict
    eval_loss: float | None
    step0_base_loss: float | None
    step0_init_loss: float | None
    trainable_params: int
    seconds: float
    peak_memory_bytes: int
    loss: list[dict] = field(default_factory=list)


def known_methods() -> list[str]:
    return sorted(set(methods.METHODS) | set(inits.INITS))


def parse_methods(spec: str, ranks: Sequence[int]) -> list[tuple[str, int | None]]:
    """`lorasb,lora:8,full` with `ranks` → [(method, rank)]: `NAME:R1/R2` overrides the ranks of one method;
    methods that train no low-rank matrices (full, head) get one rank-less entry."""
    pairs = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        name, _, own = item.partition(":")
        if name not in known_methods():
            raise BadInputError(f"unknown method '{name}' in --methods", hint=_did_you_mean(name))
        if name in methods.METHODS and not methods.METHODS[name].uses_rank:
            pairs.append((name, None))
            continue
        try:
            method_ranks = [int(r) for r in own.split("/")] if own else list(ranks)
        except ValueError:
            raise BadInputError(
                f"bad ranks in --methods item '{item}'", hint="write NAME:R1/R2, e.g. lora:8/16"
            ) from None
        if not method_ranks:
            raise BadInputError(f"no rank for method '{name}'", hint="pass --ranks or NAME:R in --methods")
        pairs += [(name, r) for r in method_ranks]
    return pairs


def parse_lrs(spec: str) -> Callable[[str], float | str]:
    """`1e-3` or `lorasb=auto,lora=2e-4,1e-3` → lr of a method, a number or auto (the bare value is the default)."""
    default, per_method = None, {}
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        name, sep, value = item.rpartition("=")
        try:
            number = value if value == "auto" else float(value)
        except ValueError:
            raise BadInputError(f"bad --lr item '{item}'", hint="write 1e-3, auto or METHOD=1e-3,...") from None
        if sep:
            per_method[name] = number
        else:
            default = number

    def lr(method: str) -> float | str:
        if method in per_method:
            return per_method[method]
        if default is None:
            raise BadInputError(f"--lr gives no learning rate for '{method}'", hint="add a bare default, e.g. ,1e-3")
        return default

    return lr


def lr_text(lr: float | str) -> str:
    return lr if isinstance(lr, str) else f"{lr:g}"


def _did_you_mean(name: str) -> str:
    from .registry import did_you_mean

    return did_you_mean(name, known_methods())


def _estimate_config(out: Path, settings: Settings, cell: Cell) -> EstimateConfig:
    """The estimate a LoRA-SB-family cell's factors start from, shared by the cells of its seed, η and samples."""
    samples, eta = cell.samples or settings.samples, cell.eta or settings.eta
    return EstimateConfig(
        **settings.model_options(),
        **settings.data_options(),
        out=str(out / "updates" / f"s{cell.seed}-n{samples}-eta{eta:g}.safetensors"),
        samples=samples,
        seed=cell.seed,
        eta=eta,
        targets=settings.targets,
    )


# decompose's per-module ranks (--budget): a cell's options may set them for its factors.
BUDGET_OPTIONS = ("budget", "budget_ratio", "min_rank", "max_rank")


def _decompose_config(out: Path, settings: Settings, cell: Cell) -> DecomposeConfig:
    """The factors of an init's cell: its estimate decomposed by the init at the cell's rank and options."""
    update = Path(_estimate_config(out, settings, cell).out)
    init = inits.INITS[cell.method]
    own = cell.options_of(lambda name: takes(init.options, name) or name in BUDGET_OPTIONS)
    suffix = "".join(f"-{name}{value}" for name, value in sorted(own.items()))
    return DecomposeConfig.from_options(
        update=str(update),
        rank=cell.rank,
        out=str(out / "factors" / f"{update.stem}-{cell.method}{suffix}-r{cell.rank}.safetensors"),
        init=cell.method,
        seed=cell.seed,
        model=settings.model if init.source == "model" else None,
        trust_remote_code=settings.trust_remote_code,
        **own,
    )


def _train_config(out: Path, settings: Settings, cell: Cell, run: Path) -> TrainConfig:
    """The cell's `lorasb train` into `run`: an init's cells train R between its factors (`--method lorasb`)."""
    # An init's factors train as LoRA-SB does: R between them, by the method that takes --factors.
    method = methods.factors_methods()[0] if cell.is_init else methods.get_method(cell.method)
    wanted = {"rank": cell.rank, "targets": settings.targets} | cell.options
    return TrainConfig.from_options(
        **settings.model_options(),
        **settings.data_options(),
        **{k: v for k, v in wanted.items() if takes(method.options, k)},
        eval_data=settings.eval_data,
        out=str(run),
        method=method.name,
        factors=_decompose_config(out, settings, cell).out if cell.is_init else None,
        lr=cell.lr,
        max_steps=settings.max_steps,
        warmup_ratio=settings.warmup_ratio,
        seed=cell.seed,
        save_steps=10**9,
    )


def check_cells(out: Path, settings: Settings, cells: Sequence[Cell]) -> None:
    """Refuse a grid with a cell whose options a stage would refuse (a rank 0, an lr of 0, ...), before anything
    is written: each cell's estimate, decompose and train configs are built and its method's options resolved."""
    for cell in cells:
        try:
            config = _train_config(out, settings, cell, out / "cells" / cell.key / "run")
            methods.get_method(config.method).resolve_options(config.method_options)
            if cell.is_init:
                _estimate_config(out, settings, cell)
                inits.INITS[cell.method].resolve_options(_decompose_config(out, settings, cell).init_options)
        except BadInputError as e:
            raise BadInputError(f"cell {cell.key}: {e.message}", path=e.path, hint=e.hint) from e


def _train_cell(out: Path, settings: Settings, cell: Cell, run: Path):
    """Train one cell into `run`, first making its estimate and factors where it needs them and they are not
    there."""
    from .decompose import decompose
    from .estimate import estimate
    from .train import train

    if cell.is_init:
        estimated, factors = _estimate_config(out, settings, cell), _decompose_config(out, settings, cell)
        for config, stage in ((estimated, estimate), (factors, decompose)):
            if not Path(config.out).is_file():
                Path(config.out).parent.mkdir(parents=True, exist_ok=True)
                stage(config)
    return train(_train_config(out, settings, cell, run))


def _evaluate(settings: Settings, out: Path, **model: str):
    """evaluate on the held-out rows into `out`; `model`: the run as `adapter`, or `template_of` for the base."""
    from .evaluate import EvaluateConfig, evaluate

    return evaluate(
        EvaluateConfig(
            **settings.model_options(),
            **model,
            task=settings.task,
            data=settings.eval_data,
            out=str(out),
            batch_size=settings.eval_batch_size,
            max_length=settings.max_length,
            max_new_tokens=settings.max_new_tokens,
            template=settings.template,
        )
    )


def run_cell(out: Path, settings: Settings, cell: Cell) -> CellResult:
    """Train and evaluate one cell in `out/cells/<key>/` (rerunning it from scratch if it was interrupted)."""
    folder = out / "cells" / cell.key
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished cell: its partial run is not resumable evidence
    folder.mkdir(parents=True)
    summary = _train_cell(out, settings, cell, folder / "run")
    scored = _evaluate(settings, folder / "eval.json", adapter=str(folder / "run"))
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    result = CellResult(
        cell=asdict(cell),
        metrics=scored.metrics,
        eval_loss=summary.final_eval_loss,
        step0_base_loss=summary.step0_base_loss,
        step0_init_loss=summary.step0_init_loss,
        trainable_params=summary.trainable_params,
        seconds=summary.seconds,
        peak_memory_bytes=summary.peak_memory_bytes,
        loss=metrics["loss"],
    )
    with artifacts.atomic_path(folder / "cell.json") as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def score_base(out: Path, settings: Settings, results: Sequence[CellResult]) -> dict | None:
    """The base model's results before any training, prompted exactly as the cells' adapters are (--template-of
    the first cell's run): the "before" every row compares with. None for a classifier, whose untrained head
    scores nothing meaningful."""
    if not results or get_task(settings.task).scoring == "classify":
        return None
    path = out / "base" / "eval.json"
    if not path.is_file():  # kept across reruns, as finished cells are
        path.parent.mkdir(parents=True, exist_ok=True)
        first = out / "cells" / Cell.from_record(results[0].cell).key / "run"
        _evaluate(settings, path, template_of=str(first))
    return json.loads(path.read_text())


def run_grid(
    out: str | Path, settings: Settings, cells: Sequence[Cell], progress: Callable[[int, int], None] | None = None
) -> list[CellResult]:
    """Run every cell not finished before (a cell is finished when its cell.json exists); returns all results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [cell.key for cell in cells]
    if len(set(keys)) != len(keys):
        raise BadInputError("the grid names one cell twice", hint="drop the repeated method, rank or seed")
    results = []
    for done, cell in enumerate(cells, start=1):
        finished = out / "cells" / cell.key / "cell.json"
        if finished.is_file():
            results.append(CellResult(**json.loads(finished.read_text())))
        else:
            log.info("cell %d/%d: %s", done, len(cells), cell.key)
            results.append(run_cell(out, settings, cell))
        if settings.metric and settings.metric not in results[-1].metrics:  # after one cell, not the whole grid
            raise BadInputError(
                f"--metric {settings.metric}: the task reports {', '.join(results[-1].metrics)}",
                hint="pick one of those (the finished cell is kept: rerun with the right --metric)",
            )
        if progress is not None:
            progress(done, len(cells))
    return results


def prepare_data(
    out: Path, data_name: str, eval_data: str | None, size: int | None, eval_size: int | None
) -> tuple[str, str]:
    """Train and held-out files shared by every cell: a built-in name is written once to `out/data/` (train
    split and test split, drawn with seed 0), so every seed trains on the same rows."""
    from . import builtin_data

    def materialize(name: str, split: str, rows: int | None) -> str:
        if name not in builtin_data.NAMES:
            return name
        path = out / "data" / f"{name}-{split}.jsonl"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            dataset = data.load_dataset_rows(name, split, size=rows, seed=0)
            with artifacts.atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(row) + "\n" for row in dataset.rows))
        return str(path)

    if eval_data is None and data_name not in builtin_data.NAMES:
        raise BadInputError("--eval-data is needed when --data is a file", hint="pass the held-out file to score")
    return materialize(data_name, "train", size), materialize(eval_data or data_name, "test", eval_size)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def primary_metric(metrics: dict) -> str:
    """The metric a table ranks by: accuracy-like first."""
    for name in ("exact_match", "accuracy", "acc", "f1", "matthews_correlation", "pearson", "loss"):
        if name in metrics:
            return name
    return next(k for k, v in metrics.items() if isinstance(v, (int, float)))


def aggregate(results: Sequence[CellResult], metric: str | None = None) -> list[dict]:
    """One row per (label, rank): mean ± std over seeds of `metric` (default: `primary_metric`) and eval loss,
    and the costs."""
    groups: dict[tuple[str, int | None], list[CellResult]] = {}
    for result in results:
        cell = Cell.from_record(result.cell)
        groups.setdefault((cell.name, cell.rank), []).append(result)
    rows = []
    for (name, rank), group in groups.items():
        name_of = metric or primary_metric(group[0].metrics)
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
    return mark_noise(rows)


def mark_noise(rows: list[dict]) -> list[dict]:
    """Each row's `vs_best`: "best", "within noise" when its mean ± std over seeds overlaps the best row's, or
    "below". A loss-like metric is best when lowest. With one seed there is no spread to judge by: "n/a"."""
    if not rows:
        return rows
    lower = any(word in rows[0]["metric"] for word in ("loss", "perplexity"))
    best = (min if lower else max)(rows, key=lambda r: r["mean"])
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
    from .console import human_bytes

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
    fig.tight_layout()
    paths = [out / "loss.png", out / "metric.png"]
    with artifacts.atomic_path(paths[0]) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)

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
    fig.tight_layout()
    with artifacts.atomic_path(paths[1]) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return paths


def write_report(
    out: str | Path,
    settings: Settings,
    results: Sequence[CellResult],
    title: str = "lorasb compare",
    sweeps: dict[str, list[dict]] | None = None,
    base: dict | None = None,
) -> Path:
    """results.md, results.json and the PNGs in `out` (sweep.png with `sweeps`); returns the markdown path. `base`:
    the untrained base model's results (score_base), reported above the table."""
    out = Path(out)
    rows = aggregate(results, settings.metric)
    plot(results, rows, out, title)
    with artifacts.atomic_path(out / "results.json") as tmp:
        payload = {"settings": asdict(settings), "rows": rows, "cells": [asdict(r) for r in results], "base": base}
        tmp.write_text(json.dumps(payload | ({"lr_sweep": sweeps} if sweeps else {}), indent=2, default=str) + "\n")
    text = (
        f"# {title}\n\nModel `{settings.model}`, task `{settings.task}`, {settings.max_steps} steps of batch "
        f"{settings.batch_size}, estimate over {settings.samples} samples at η {settings.eta:g}.\n\n"
        + _base_line(base, rows)
        + markdown_table(rows)
        + "\n![loss curves](loss.png)\n\n![metric vs trainable parameters](metric.png)\n"
    )
    if sweeps:
        plot_sweeps(sweeps, out / "sweep.png", title)
        text += (
            "\nEach method's lr is the lowest validation loss of its sweep (seed 0, its first rank, a slice of the "
            "training rows; never the test rows); every point is in results.json.\n\n![lr sweeps](sweep.png)\n"
        )
    with artifacts.atomic_path(out / "results.md") as tmp:
        tmp.write_text(text)
    return out / "results.md"


# The first sweep: 5 points, half a decade apart, around each method's --lr; then one more beyond an edge that
# wins, up to SWEEP_MAX points.
SWEEP_STEP = 10**0.5
SWEEP_MAX = 9


def sweep_lrs(
    out: Path, settings: Settings, pairs: Sequence[tuple[str, int | None]], lr: Callable[[str], float]
) -> tuple[Callable[[str], float], dict[str, list[dict]]]:
    """Each method's lr by validation loss (the per-sample mean on a slice held out of the training rows), at its
    first rank and seed 0; returns the chosen lr per method and every sweep point ({lr, loss}) per method. Points
    already run (their point.json in `out`) are kept, so an interrupted sweep resumes."""
    train_part, validation = _validation_split(out, settings)
    swept = dataclasses.replace(settings, train_data=train_part, eval_data=validation, split="train", data_config=None)
    chosen, points = {}, {}
    for method, rank in pairs:
        if method in chosen:  # the family's other ranks reuse its rate
            continue
        losses: dict[float, float] = {}
        todo = [lr(method) * SWEEP_STEP**k for k in range(-2, 3)]
        while todo:
            for value in todo:
                losses[value] = _sweep_point(out, swept, Cell(method=method, rank=rank, seed=0, lr=value))
            best, ordered = min(losses, key=losses.get), sorted(losses)
            todo = []
            if len(losses) < SWEEP_MAX and best in (ordered[0], ordered[-1]):
                todo = [best / SWEEP_STEP if best == ordered[0] else best * SWEEP_STEP]
        chosen[method] = min(losses, key=losses.get)
        points[method] = [{"lr": value, "loss": losses[value]} for value in sorted(losses)]
        log.info("--lr-sweep %s: lr %g (validation loss %.4f)", method, chosen[method], losses[chosen[method]])
    return chosen.__getitem__, points


def _validation_split(out: Path, settings: Settings) -> tuple[str, str]:
    """The training rows as two files in `out/data/`: all but a slice (1/10, 16 to 256 rows) and that slice."""
    paths = (out / "data" / "train.jsonl", out / "data" / "validation.jsonl")
    if not all(p.is_file() for p in paths):
        rows = list(data.load_dataset_rows(settings.train_data, settings.split, settings.data_config, fields=None).rows)
        held = max(16, min(256, len(rows) // 10))
        if len(rows) < 2 * held:
            raise BadInputError(
                f"--lr-sweep needs at least {2 * held} training rows to hold {held} out", hint="pass more --data rows"
            )
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, part in zip(paths, (rows[:-held], rows[-held:])):
            with artifacts.atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(row) + "\n" for row in part))
    return str(paths[0]), str(paths[1])


def _sweep_point(out: Path, settings: Settings, cell: Cell) -> float:
    """The validation loss of one sweep run, trained once into `out/points/<key>/`."""
    folder = out / "points" / cell.key
    finished = folder / "point.json"
    if finished.is_file():
        return json.loads(finished.read_text())["loss"]
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished point
    folder.mkdir(parents=True)
    summary = _train_cell(out, settings, cell, folder / "run")
    with artifacts.atomic_path(finished) as tmp:
        tmp.write_text(json.dumps({"cell": asdict(cell), "loss": summary.final_eval_loss}) + "\n")
    return summary.final_eval_loss


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
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def grid(pairs: Sequence[tuple[str, int | None]], seeds: int, lr: Callable[[str], float]) -> list[Cell]:
    """Cells of every (method, rank) for seeds 0..seeds-1."""
    if seeds < 1:
        raise BadInputError(f"--seeds {seeds} must be positive")
    return [Cell(method=m, rank=r, seed=s, lr=lr(m)) for m, r in pairs for s in range(seeds)]
