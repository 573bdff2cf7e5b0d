"""The CLI's stderr side: rich logging, progress bars and tables. Stage functions never import this."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import metadata

stderr = Console(stderr=True)
stdout = Console()
_quiet = False
_rank = 0


def setup_logging(*, debug: bool, quiet: bool, rank: int = 0) -> None:
    """Route the library's logs to stderr; `quiet` also silences summary tables.

    Under a launcher, global rank `rank` > 0 shows no bars or tables and logs warnings and errors (everything with
    `debug`) prefixed `[rank N]`, as the Trainer's `log_level_replica`: rank 0 speaks for the job.
    """
    global _quiet, _rank
    _quiet, _rank = quiet or rank > 0, rank
    level = logging.DEBUG if debug else logging.WARNING if quiet or rank > 0 else logging.INFO
    logger = logging.getLogger("lorasb")
    handler = RichHandler(console=stderr, show_time=False, show_path=False, markup=False)
    if rank > 0:
        handler.setFormatter(logging.Formatter(f"{rank_prefix()}%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def rank_prefix() -> str:
    """`[rank N] ` for what a rank other than 0 writes to stderr; empty on rank 0 and without a launcher."""
    return f"[rank {_rank}] " if _rank > 0 else ""


@contextlib.contextmanager
def progress_bar(
    description: str, *, enabled: bool = True, fields: Sequence[str] = ()
) -> Iterator[Callable[..., None]]:
    """Yield `update(done, total, **values)` driving one rich bar on stderr (a no-op when disabled, and on ranks >
    0), which shows each of `fields` as `name value` from the latest update that gave it. The bar appears with the
    first update: a stage that fails its checks before any work prints its error line alone."""
    if not enabled or _rank > 0:
        yield lambda done, total, **values: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with contextlib.ExitStack() as stack:
        shown: list = []  # [(Progress, task id)] once the first update came

        def update(done: int, total: int, **values) -> None:
            if not shown:
                progress = stack.enter_context(Progress(*columns, console=stderr))
                task = progress.add_task(description, total=total, **dict.fromkeys(fields, "-"))
                shown.append((progress, task))
            progress, task = shown[0]
            progress.update(task, completed=done, total=total, **values)

        yield update


@contextlib.contextmanager
def train_progress(*, enabled: bool = True) -> Iterator[tuple[Callable[[int, int], None], Callable[[object], None]]]:
    """Yield `(progress(step, steps), log_step(stats))` for `lorasb train` (stats: a trainer.StepStats). On a
    terminal they drive the bar, which shows the latest logged loss and tokens/s; otherwise (a file, a pipe) a bar
    would print once, at the end, so each logging step is one plain line (`step_line`) instead. Silent when
    disabled (--quiet) and on ranks > 0."""
    if not enabled or _rank > 0:
        yield (lambda step, steps: None), (lambda stats: None)
        return
    if not stderr.is_terminal:
        yield (
            (lambda step, steps: None),
            (lambda stats: stderr.print(step_line(stats), soft_wrap=True, markup=False, highlight=False)),
        )
        return
    with progress_bar("train", fields=("loss", "tok/s")) as update:

        def log_step(stats) -> None:
            rate = "-" if stats.tokens_per_second is None else f"{stats.tokens_per_second:.0f}"
            update(stats.step, stats.total, **{"loss": f"{stats.loss:.4f}", "tok/s": rate})

        yield update, log_step


def step_line(stats) -> str:
    """One logging step as a plain line: `step 20/200  loss 1.2345  lr 9.5e-04  grad-norm 0.812  tok/s 1234
    elapsed 0:00:42  eta 0:06:18` (`-`: not measured)."""

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def clock(seconds: float) -> str:
        return str(dt.timedelta(seconds=round(seconds)))

    return "  ".join(
        [
            f"step {stats.step}/{stats.total}",
            f"loss {stats.loss:.4f}",
            f"lr {number(stats.lr, '.1e')}",
            f"grad-norm {number(stats.grad_norm, '.3f')}",
            f"tok/s {number(stats.tokens_per_second, '.0f')}",
            f"elapsed {clock(stats.elapsed)}",
            f"eta {clock(stats.eta)}",
        ]
    )


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A table on stderr whose cells wrap, never cut, at any width."""
    if _quiet:
        return
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*(str(value) for value in row))
    stderr.print(table)


def print_summary(title: str, fields: Sequence[tuple[str, object]]) -> None:
    """A stage's summary on stderr as `field  value` lines that wrap, never cut: labels that say what a number is
    ("measured peak (process RSS)") stay whole at 80 columns, where a one-row table of them would not."""
    if _quiet:
        return
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(overflow="fold")
    table.add_column(justify="right", overflow="fold")
    for name, value in fields:
        table.add_row(name, str(value))
    stderr.print(table)


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def _span(ranks: list[int]) -> str:
    """Ranks as "r" when they are one, else "lowest–highest" (per-module ranks of decompose --budget)."""
    if not ranks:
        return "-"
    low, high = min(ranks), max(ranks)
    return str(low) if low == high else f"{low}–{high}"


def _provenance_rows(meta: metadata.ArtifactMeta | metadata.MergedMeta | None) -> list[tuple[str, object]]:
    """What inspect shows of an artifact's metadata, or of a merged checkpoint's (the base it was merged into)."""
    if isinstance(meta, metadata.MergedMeta):
        return [("base model", meta.base_model)]
    if meta is None:
        return []
    data = meta.data or metadata.DataProvenance()
    return [
        ("budget", _budget_text(meta.budget) if isinstance(meta, metadata.FactorsMeta) else None),
        ("base model", meta.base_model.id),
        ("fingerprint", meta.base_model.fingerprint),
        ("targets", list(meta.targets) if isinstance(meta.targets, tuple) else meta.targets),
        ("method / init", " / ".join(str(name) for name in (meta.method, meta.init) if name)),
        ("data", data.source),
        ("samples", meta.samples),
        ("eta", meta.eta),
        ("seed", meta.seed),
        ("created", meta.created),
        ("versions", ", ".join(f"{k} {v}" for k, v in (meta.versions or {}).items())),
    ]


def _budget_text(budget: dict | None) -> str | None:
    if not budget:
        return None
    return (
        f"Σ r² = {budget['spent']:,} of {budget['parameters']:,} (r = {budget['uniform_rank']} everywhere: "
        f"{budget['uniform_parameters']:,})"
    )


def print_description(description: dict) -> None:
    """`lorasb inspect`'s report on stdout: the artifact, its provenance, its modules grouped by kind."""
    meta = metadata.described(description["provenance"])
    summary = Table(show_header=False, title=description["path"], title_justify="left")
    summary.add_column(overflow="fold")
    summary.add_column(overflow="fold")
    rows = [
        ("kind", description["kind"]),
        ("modules", description["modules"]),
        ("rank", _span(description["rank"]) if isinstance(description["rank"], list) else description["rank"]),
        *_provenance_rows(meta),
        *((f"params: {k}", f"{v:,}") for k, v in description["parameters"].items()),
    ]
    rows = [(key, str(value)) for key, value in rows if value not in (None, "")]
    groups: dict[str, list[dict]] = {}
    for module, info in description["shapes"].items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", module), []).append(info)
    modules = [
        [
            kind,
            str(len(infos)),
            ", ".join(sorted({"×".join(map(str, i["shape"])) for i in infos})),
            _span([i["rank"] for i in infos if "rank" in i]),
        ]
        for kind, infos in groups.items()
    ]
    blocks = [("modules", ("module", "count", "shape (m×n)", "rank"), modules)]
    if isinstance(meta, metadata.UpdateMeta) and meta.stability:
        blocks.append((STABILITY_TITLE, STABILITY_COLUMNS, stability_rows(meta.stability)))
    if not stdout.is_terminal:
        write_tsv(("field", "value"), [("path", description["path"]), *rows])
        for _, columns, cells in blocks:
            if cells:
                sys.stdout.write("\n")
                write_tsv(columns, cells)
        return
    for key, value in rows:
        summary.add_row(key, value)
    stdout.print(summary)
    for title, columns, cells in blocks:
        if cells:
            _print_listing(title, columns, cells)


STABILITY_TITLE = "top-r subspace overlap of the sample's two halves (1 = the same; random ≈ r/dim)"
STABILITY_COLUMNS = ("modules", "r", "overlap", "lowest", "random")


def stability_rows(report: dict) -> list[list[str]]:
    """The rows of STABILITY_COLUMNS for estimate's stability report (lorasb_cli/stability.py)."""
    from .stability import by_kind

    return [
        [kind, str(rank), f"{mean:.3f}", f"{low:.3f}", f"{random:.3f}"]
        for kind, rank, mean, low, random in by_kind(report)
    ]


def print_rows(title: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """A listing command's output (its product, so on stdout). On a terminal a table whose cells wrap, never cut;
    in a pipe, tab-separated lines under a header line, so `| grep`, `| cut -f1` and `| column -t` see whole names."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    if not stdout.is_terminal:
        write_tsv(columns, cells)
        return
    _print_listing(title, columns, cells)


def _print_listing(title: str, columns: Sequence[str], cells: Sequence[Sequence[str]]) -> None:
    """A table on stdout whose cells wrap, never cut."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in cells:
        table.add_row(*row)
    stdout.print(table)


def write_tsv(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Tab-separated lines on stdout; tabs and newlines inside a cell become spaces."""
    for line in [columns, *rows]:
        sys.stdout.write("\t".join(re.sub(r"[\t\n\r]+", " ", cell) for cell in line) + "\n")


def _cell(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return "" if value is None else str(value)
