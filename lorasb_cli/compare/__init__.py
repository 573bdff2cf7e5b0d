"""`lorasb compare`: run a grid of methods × ranks × seeds on the same data, steps and evaluation, and report it.

`cells`: what one run is and the grid the options describe; `runs`: running the grid (and the lr sweep) through
the stages' public functions; `report`: results.md, results.json and the PNGs, ranked as the task declares.
"""

from ..configs import CompareConfig, GridSettings
from .cells import Cell, CellResult, grid, known_methods, parse_lrs, parse_methods
from .report import aggregate, curve_rows, curve_table, mark_noise, markdown_table, write_report
from .runs import SWEEP_MAX, CompareSummary, compare, prepare_data, run_cell, run_grid, score_base, sweep_lrs

__all__ = [
    "SWEEP_MAX",
    "Cell",
    "CellResult",
    "CompareConfig",
    "CompareSummary",
    "GridSettings",
    "aggregate",
    "compare",
    "curve_rows",
    "curve_table",
    "grid",
    "known_methods",
    "mark_noise",
    "markdown_table",
    "parse_lrs",
    "parse_methods",
    "prepare_data",
    "run_cell",
    "run_grid",
    "score_base",
    "sweep_lrs",
    "write_report",
]
