"""A compare grid's cells: what one run is (`Cell`), what it produced (`CellResult`), and the grid the
`--methods`, `--ranks`, `--lr` and `--seeds` options describe."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import inits, methods
from ..errors import BadInputError
from ..registry import did_you_mean


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
    # --score-steps: {step, metrics, eval_loss} at each scored step and the last (empty without the option)
    curve: list[dict] = field(default_factory=list)


def known_methods() -> list[str]:
    return sorted(set(methods.METHODS) | set(inits.INITS))


def parse_methods(spec: str, ranks: Sequence[int]) -> list[tuple[str, int | None]]:
    """`lorasb,lora:8,full` with `ranks` → [(method, rank)]: `NAME:R1/R2` overrides the ranks of one method;
    methods that train no low-rank matrices (full, head) get one rank-less entry."""
    pairs = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        name, _, own = item.partition(":")
        if name not in known_methods():
            raise BadInputError(f"unknown method '{name}' in --methods", hint=did_you_mean(name, known_methods()))
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


def parse_score_steps(spec: str | None, max_steps: int) -> tuple[int, ...]:
    """`40,150` → (40, 150): the steps before the last at which every cell is scored too."""
    try:
        steps = tuple(sorted({int(part) for part in (spec or "").split(",") if part.strip()}))
    except ValueError:
        raise BadInputError(f"--score-steps '{spec}' must be a comma list of steps", hint="e.g. 40,150") from None
    if any(not 0 < step < max_steps for step in steps):
        raise BadInputError(
            f"--score-steps {spec}: each step must lie between 1 and --max-steps {max_steps} (the last is scored anyway)",
            hint=f"pass steps below {max_steps}",
        )
    return steps


def lr_text(lr: float | str) -> str:
    """A cell's lr as the table and its folder name show it: `3e-3`, or `auto`."""
    return lr if isinstance(lr, str) else f"{lr:g}"


def grid(pairs: Sequence[tuple[str, int | None]], seeds: int, lr: Callable[[str], float]) -> list[Cell]:
    """Cells of every (method, rank) for seeds 0..seeds-1."""
    if seeds < 1:
        raise BadInputError(f"--seeds {seeds} must be positive")
    return [Cell(method=m, rank=r, seed=s, lr=lr(m)) for m, r in pairs for s in range(seeds)]
