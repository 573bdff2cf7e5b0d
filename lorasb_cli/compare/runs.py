"""Running a compare grid: each cell's estimate, decompose, train and evaluate configs, built from the grid's
shared settings (the model and data groups whole), the cells themselves, the base model's score and the lr sweep.

Every cell is one `train` run and one `evaluate` of its adapter on the held-out data; a cell is done when its
`cell.json` exists, so an interrupted grid resumes where it stopped. One estimate per seed (and per η or sample
count, where an ablation changes them) is shared by every LoRA-SB-family cell of that seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import data, files, inits, methods, models
from ..configs import COMPARE_MAX_LENGTH, CompareConfig, DecomposeConfig, EstimateConfig, GridSettings, TrainConfig
from ..errors import BadInputError
from ..options import ModelOptions, TrainingDataOptions, group_values, takes
from ..tasks import get_task
from .cells import Cell, CellResult, grid, parse_lrs, parse_methods, parse_score_steps
from .report import aggregate, write_report

log = logging.getLogger("lorasb")


def model_options(settings: GridSettings) -> dict:
    """The model group whole, as every cell's estimate, train and evaluate take it."""
    return group_values(settings, ModelOptions)


def data_options(settings: GridSettings) -> dict:
    """The training data group whole, as every cell's estimate and train take it: `data` is already a file (a
    built-in's rows written once by `prepare_data`), so no `size` draws it again."""
    return group_values(settings, TrainingDataOptions) | {"size": None}


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
    parse_score_steps(config.score_steps, config.max_steps)
    task = get_task(config.task)
    if config.metric is not None and not task.has_metric(config.metric):  # before any cell runs
        raise BadInputError(
            f"--metric {config.metric}: task {task.name} reports {', '.join(task.metrics)}", hint="pick one of those"
        )
    out = Path(config.out)
    max_length = models.fit_max_length(
        config.max_length,
        COMPARE_MAX_LENGTH,
        models.resolve_model(config.model),
        trust_remote_code=config.trust_remote_code,
    )
    # What every cell shares: the config's GridSettings part as given, at the fitted length.
    given = GridSettings(**group_values(config, GridSettings) | {"max_length": max_length})
    check_cells(out, dataclasses.replace(given, eval_data=config.eval_data or config.data), cells)  # before any write
    existed = out.exists()
    try:
        train_data, held_out = prepare_data(out, config.data, config.eval_data, config.size, config.eval_size)
        settings = dataclasses.replace(given, data=train_data, eval_data=held_out)
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
    return CompareSummary(report, len(results), aggregate(results, task, config.metric))


def _estimate_config(out: Path, settings: GridSettings, cell: Cell) -> EstimateConfig:
    """The estimate a LoRA-SB-family cell's factors start from, shared by the cells of its seed, η and samples."""
    samples, eta = cell.samples or settings.samples, cell.eta or settings.eta
    return EstimateConfig(
        **model_options(settings),
        **data_options(settings),
        out=str(out / "updates" / f"s{cell.seed}-n{samples}-eta{eta:g}.safetensors"),
        samples=samples,
        seed=cell.seed,
        eta=eta,
        targets=settings.targets,
    )


# decompose's per-module ranks (--budget): a cell's options may set them for its factors.
BUDGET_OPTIONS = ("budget", "budget_ratio", "min_rank", "max_rank")


def _decompose_config(out: Path, settings: GridSettings, cell: Cell) -> DecomposeConfig:
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


def _train_config(out: Path, settings: GridSettings, cell: Cell, run: Path) -> TrainConfig:
    """The cell's `lorasb train` into `run`: an init's cells train R between its factors (`--method lorasb`)."""
    # An init's factors train as LoRA-SB does: R between them, by the method that takes --factors.
    method = methods.factors_methods()[0] if cell.is_init else methods.get_method(cell.method)
    wanted = {"rank": cell.rank, "targets": settings.targets} | cell.options
    return TrainConfig.from_options(
        **model_options(settings),
        **data_options(settings),
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
        logging_steps=1,  # loss.png's curves: the loss of every step
    )


def check_cells(out: Path, settings: GridSettings, cells: Sequence[Cell]) -> None:
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


def _train_cell(out: Path, settings: GridSettings, cell: Cell, run: Path, save_at: Sequence[int] = ()):
    """Train one cell into `run` (with a checkpoint at each step of `save_at`), first making its estimate and
    factors where it needs them and they are not there."""
    from ..decompose import decompose
    from ..estimate import estimate
    from ..train import train
    from ..trainer import SaveAtSteps

    if cell.is_init:
        estimated, factors = _estimate_config(out, settings, cell), _decompose_config(out, settings, cell)
        for config, stage in ((estimated, estimate), (factors, decompose)):
            if not Path(config.out).is_file():
                Path(config.out).parent.mkdir(parents=True, exist_ok=True)
                stage(config)
    return train(_train_config(out, settings, cell, run), callbacks=[SaveAtSteps(save_at)] if save_at else ())


def _evaluate(settings: GridSettings, out: Path, task: str | None = None, **model: str):
    """evaluate on the held-out rows into `out` by `task` (default: the grid's); `model`: the run as `adapter`, or
    `template_of` for the base."""
    from ..evaluate import EvaluateConfig, evaluate

    return evaluate(
        EvaluateConfig(
            **model_options(settings),
            **model,
            task=task or settings.task,
            data=settings.eval_data,
            out=str(out),
            batch_size=settings.eval_batch_size,
            max_length=settings.max_length,
            max_new_tokens=settings.max_new_tokens,
            template=settings.template,
            system_prompt=settings.system_prompt,
        )
    )


def run_cell(out: Path, settings: GridSettings, cell: Cell) -> CellResult:
    """Train and evaluate one cell in `out/cells/<key>/` (rerunning it from scratch if it was interrupted)."""
    folder = out / "cells" / cell.key
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished cell: its partial run is not resumable evidence
    folder.mkdir(parents=True)
    steps = parse_score_steps(settings.score_steps, settings.max_steps)
    summary = _train_cell(out, settings, cell, folder / "run", save_at=steps)
    scored = _evaluate(settings, folder / "eval.json", adapter=str(folder / "run"))
    metrics = json.loads((folder / "run" / "metrics.json").read_text())
    curve = [_score_checkpoint(settings, folder, step) for step in steps]
    if curve:
        curve.append({"step": summary.steps, "metrics": scored.metrics, "eval_loss": summary.final_eval_loss})
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
        curve=curve,
    )
    with files.atomic_path(folder / "cell.json") as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def _score_checkpoint(settings: GridSettings, folder: Path, step: int) -> dict:
    """A cell's run as it was at `step` (its checkpoint, an adapter): the task's metrics and the response loss on
    the held-out rows, the per-sample mean the run's own eval loss is (evaluate's perplexity task, loss_per_sample)."""
    checkpoint = str(folder / "run" / f"checkpoint-{step}")
    scored = _evaluate(settings, folder / f"eval-step{step}.json", adapter=checkpoint)
    loss = _evaluate(settings, folder / f"loss-step{step}.json", task="perplexity", adapter=checkpoint)
    return {"step": step, "metrics": scored.metrics, "eval_loss": loss.metrics["loss_per_sample"]}


def score_base(out: Path, settings: GridSettings, results: Sequence[CellResult]) -> dict | None:
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
    out: str | Path, settings: GridSettings, cells: Sequence[Cell], progress: Callable[[int, int], None] | None = None
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
    from .. import builtin_data

    def materialize(name: str, split: str, rows: int | None) -> str:
        if name not in builtin_data.NAMES:
            return name
        path = out / "data" / f"{name}-{split}.jsonl"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            dataset = data.load_dataset_rows(name, split, size=rows, seed=0)
            with files.atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(row) + "\n" for row in dataset.rows))
        return str(path)

    if eval_data is None and data_name not in builtin_data.NAMES:
        raise BadInputError("--eval-data is needed when --data is a file", hint="pass the held-out file to score")
    return materialize(data_name, "train", size), materialize(eval_data or data_name, "test", eval_size)


# The first sweep: 5 points, half a decade apart, around each method's --lr; then one more beyond an edge that
# wins, up to SWEEP_MAX points.
SWEEP_STEP = 10**0.5
SWEEP_MAX = 9


def sweep_lrs(
    out: Path, settings: GridSettings, pairs: Sequence[tuple[str, int | None]], lr: Callable[[str], float]
) -> tuple[Callable[[str], float], dict[str, list[dict]]]:
    """Each method's lr by validation loss (the per-sample mean on a slice held out of the training rows), at its
    first rank and seed 0; returns the chosen lr per method and every sweep point ({lr, loss}) per method. Points
    already run (their point.json in `out`) are kept, so an interrupted sweep resumes."""
    train_part, validation = _validation_split(out, settings)
    swept = dataclasses.replace(settings, data=train_part, eval_data=validation, split="train", data_config=None)
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


def _validation_split(out: Path, settings: GridSettings) -> tuple[str, str]:
    """The training rows as two files in `out/data/`: all but a slice (1/10, 16 to 256 rows) and that slice."""
    paths = (out / "data" / "train.jsonl", out / "data" / "validation.jsonl")
    if not all(p.is_file() for p in paths):
        rows = list(data.load_dataset_rows(settings.data, settings.split, settings.data_config, fields=None).rows)
        held = max(16, min(256, len(rows) // 10))
        if len(rows) < 2 * held:
            raise BadInputError(
                f"--lr-sweep needs at least {2 * held} training rows to hold {held} out", hint="pass more --data rows"
            )
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, part in zip(paths, (rows[:-held], rows[-held:])):
            with files.atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(row) + "\n" for row in part))
    return str(paths[0]), str(paths[1])


def _sweep_point(out: Path, settings: GridSettings, cell: Cell) -> float:
    """The validation loss of one sweep run, trained once into `out/points/<key>/`."""
    folder = out / "points" / cell.key
    finished = folder / "point.json"
    if finished.is_file():
        return json.loads(finished.read_text())["loss"]
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished point
    folder.mkdir(parents=True)
    summary = _train_cell(out, settings, cell, folder / "run")
    with files.atomic_path(finished) as tmp:
        tmp.write_text(json.dumps({"cell": asdict(cell), "loss": summary.final_eval_loss}) + "\n")
    return summary.final_eval_loss
