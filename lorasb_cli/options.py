"""Options declared once: a dataclass field carries its flag, help and default, and `click_param` makes the click
option of each field of the config class a command fills (`cli.ConfigCommand`, when the command first needs them).
The groups every command that reads a model or data shares live here (`ModelOptions`, `DataOptions`, `TrainingDataOptions`); a stage's config adds its own fields,
and a plug-in (method, init) declares its options the same way (`plugin_options` builds and checks them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import click

from .errors import BadInputError


@dataclass(frozen=True)
class Range:
    """The values a numeric option takes: finite numbers from `low` to `high` (None: unbounded), an end excluded
    where `open_low` / `open_high`. Click shows it in the help and checks it while parsing; `check_ranges` checks a
    config built in Python."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.open_low else value >= self.low)
        below = self.high is None or (value < self.high if self.open_high else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '≥'} {self.low:g}"
        return f"{'<' if self.open_high else '≤'} {self.high:g}"

    def click_type(self, kind: type) -> click.ParamType:
        bounds = {"min": self.low, "max": self.high, "min_open": self.open_low, "max_open": self.open_high}
        return click.IntRange(**bounds) if kind is int else _FiniteFloatRange(**bounds)


class _FiniteFloatRange(click.FloatRange):
    """click's FloatRange lets NaN through (every comparison with it is false) and ±Inf past an open end."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


POSITIVE = Range(0, open_low=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
SEED = Range(0, 2**32 - 1)  # what every generator (torch, numpy, random) takes alike
FRACTION = Range(0, 1, open_low=True)  # (0, 1]


def positive_or_auto(value: float | str, flag: str) -> float | str:
    """The value of an option that is a number > 0 or `auto` (train --lr, --init-scale), given as text or a
    number: `auto`, or the number."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if number not in POSITIVE:
        raise BadInputError(f"{flag} {value} must be a finite number {POSITIVE} or auto")
    return number


class _PositiveOrAuto(click.ParamType):
    """A number > 0 or `auto` on the command line: a number is checked as POSITIVE's click type checks it."""

    name = "FLOAT|auto"

    def convert(self, value, param, ctx):
        return value if value == "auto" else POSITIVE.click_type(float).convert(value, param, ctx)


POSITIVE_OR_AUTO = _PositiveOrAuto()


def check_ranges(options) -> None:
    """Refuse a value outside its option's declared range (one line naming the flag), in a config built in Python
    as on the command line."""
    for f in cli_fields(type(options)):
        declared, value = f.metadata["cli"].get("range"), getattr(options, f.name)
        if declared is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if value not in declared:
            raise BadInputError(f"{flag_of(f.name)} {value} must be a finite number {declared}")


class Declared:
    """Base of the option dataclasses: their declared ranges are checked when one is made."""

    def __post_init__(self):
        check_ranges(self)


def option(
    *decls: str,
    default=None,
    help: str | Callable[[], str],
    type=None,
    flag: bool = False,
    required: bool = False,
    metavar: str | None = None,
    show_default: bool | str | None = None,
    range: Range | None = None,
    multiple: bool = False,
):
    """A dataclass field that is also a click option; `decls` default to `--field-name`; `range`: the values a
    number may take; `multiple`: the option may be given again, its values a tuple (default empty). `help` may be
    a function, called when the option is made (lazily: `cli.ConfigCommand`), for a text read from the plug-in
    registrations."""
    if multiple:
        default, show_default, type = (), False, type or str
    spec = {"decls": decls, "help": help, "type": type, "flag": flag, "required": required, "metavar": metavar}
    spec["range"], spec["multiple"] = range, multiple
    spec["show_default"] = show_default if show_default is not None else default is not None and not flag
    # A required option has no default in the dataclass either: a config built in Python must name it too.
    missing = required and default is None
    return dataclasses.field(default=dataclasses.MISSING if missing else default, metadata={"cli": spec})


def argument(*, required: bool = True, many: bool = False):
    """A dataclass field that is the command's positional argument (`many`: all remaining ones, a tuple)."""
    spec = {"argument": True, "required": required, "many": many}
    return dataclasses.field(default=dataclasses.MISSING if required else None, metadata={"cli": spec})


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "cli" in f.metadata]


def click_param(f: dataclasses.Field, *, plugin: bool = False) -> click.Parameter:
    """The click option (or argument) of a field. A plug-in's option (`plugin`) is never required by click and
    defaults to None, "not given": the chosen plug-in fills its own default and rejects what it does not take."""
    spec = f.metadata["cli"]
    if spec.get("argument"):
        return click.Argument([f.name], required=spec["required"], nargs=-1 if spec["many"] else 1)
    decls = spec["decls"] or (flag_of(f.name),)
    default = None if f.default is dataclasses.MISSING else f.default
    kind = spec["type"] if spec["type"] is not None else type(default) if default is not None else None
    if spec.get("range") is not None:
        kind = spec["range"].click_type(kind)
    extra = {"is_flag": True} if spec["flag"] else {"type": kind} if kind is not None else {}
    if spec.get("multiple"):
        extra["multiple"] = True
    help_text = spec["help"]() if callable(spec["help"]) else spec["help"]
    show_default = spec["show_default"]
    if plugin:
        if default is not None and show_default:
            help_text = f"{help_text}  [default: {default}]"
        default, show_default = None, False
    if default is not None:  # click tells "not given" from an explicit None default
        extra["default"] = default
    return click.Option(
        [*decls, f.name],
        required=spec["required"] and not plugin,
        help=help_text,
        metavar=spec["metavar"],
        show_default=show_default,
        **extra,
    )


def plugin_fields(option_classes: Iterable[type]) -> list[dataclasses.Field]:
    """The options of all plug-ins of one kind, each name once (its first declaration), for one command."""
    seen: dict[str, dataclasses.Field] = {}
    for cls in option_classes:
        for f in cli_fields(cls):
            seen.setdefault(f.name, f)
    return list(seen.values())


class PluginConfig(Declared):
    """Base of a stage config that also takes one kind of plug-in's options (train: the methods', decompose: the
    inits'): the chosen plug-in's options arrive as given in the field `PLUGIN_FIELD`, and `plugin_fields()` are the
    flags of every plug-in of that kind."""

    PLUGIN_FIELD: ClassVar[str]

    @staticmethod
    def plugin_fields() -> list[dataclasses.Field]:
        raise NotImplementedError

    @classmethod
    def from_options(cls, **values):
        """The config from flat options, as the command line gives them (`build`)."""
        return build(cls, values)


def plugin_fields_of(cls) -> list[dataclasses.Field]:
    """The plug-in flags a config class takes besides its own fields (none unless it is a `PluginConfig`)."""
    return cls.plugin_fields() if issubclass(cls, PluginConfig) else []


def build(cls, values: Mapping[str, object]):
    """A config from flat option values, as the CLI parses them: `cls`'s own fields, and where `cls.PLUGIN_FIELD`
    names one, the plug-in options that were given (not None) gathered into it."""
    own = {f.name for f in dataclasses.fields(cls)}
    config = {k: v for k, v in values.items() if k in own}
    rest = {k: v for k, v in values.items() if k not in own}
    plugin = cls.PLUGIN_FIELD if issubclass(cls, PluginConfig) else None
    if plugin is None and rest:
        raise TypeError(f"{cls.__name__} has no options {', '.join(rest)}")
    if plugin is not None:
        config[plugin] = {**config.get(plugin, {}), **{k: v for k, v in rest.items() if v is not None}}
    return cls(**config)


def takes(cls, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


def flag_of(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def plugin_options(cls, given: Mapping[str, object], *, kind: str, name: str, takers: Callable[[str], list[str]]):
    """`cls(**given)`: the options of the plug-in `kind name` (e.g. --method lora). An option it does not take is a
    one-line error naming the plug-ins that do (`takers(option)`), a required one not given another;
    `cls.__post_init__` checks the values."""
    for option_name in given:
        if not takes(cls, option_name):
            users = takers(option_name)
            raise BadInputError(
                f"{flag_of(option_name)} applies to {kind} {', '.join(users)} only"
                if users
                else f"{flag_of(option_name)} is an option of no {kind}",
                hint=f"drop {flag_of(option_name)}",
            )
    for f in cli_fields(cls):
        if f.metadata["cli"]["required"] and given.get(f.name) is None:
            raise BadInputError(f"{kind} {name} needs {flag_of(f.name)}", hint=f"pass {flag_of(f.name)}")
    return cls(**given)


def redeclared(group: type, name: str, **changes):
    """The option `name` of the option class `group` (e.g. DataOptions.split) for a command where it means a little
    else: `changes` replace its `default`, `help`, `required` or `show_default`; its flags, type and range stay the
    group's one declaration."""
    field = next(f for f in dataclasses.fields(group) if f.name == name)
    spec = field.metadata["cli"]
    default = changes.pop("default", None if field.default is dataclasses.MISSING else field.default)
    if "show_default" not in changes and not spec["flag"] and default == field.default:
        changes["show_default"] = spec["show_default"]  # as declared, e.g. a default the model caps
    unknown = set(changes) - {"help", "required", "show_default"}
    if unknown:
        raise TypeError(f"redeclared cannot change {', '.join(sorted(unknown))} of --{name}")
    kept = {key: spec[key] for key in ("help", "type", "flag", "required", "metavar", "range")}
    return option(*spec["decls"], default=default, **kept | changes)


def group_values(config, group: type) -> dict[str, object]:
    """The values `config` holds for the fields of the option group `group` (one of its bases, e.g. ModelOptions):
    how a command that runs other stages (compare) hands each of them a whole group."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(group)}


def targets(help: str = "all-linear, attention, or suffixes q_proj,v_proj."):
    """--targets, for every command that picks the modules to adapt."""
    return option(default="all-linear", help=help)


def rank(*, help: str, default: int | None = None, required: bool = False):
    """--rank/-r: a rank of low-rank matrices, declared by each command with its own meaning and default."""
    return option("--rank", "-r", default=default, type=int, range=AT_LEAST_1, required=required, help=help)


def trust_remote_code(help: str = "Allow the model repo's own Python code."):
    """--trust-remote-code, for every command that loads a model or its checkpoint."""
    return option(flag=True, default=False, help=help)


MAX_LENGTH = 512  # --max-length when not given, capped at the model's position limit (models.fit_max_length)


@dataclass(frozen=True, kw_only=True)
class ModelOptions(Declared):
    """Which model, and how it is placed: every command that loads one."""

    model: str = option("--model", "-m", required=True, help="Local HF directory, hub id, or alias (e.g. mistral).")
    dtype: str = option(default="auto", help="auto, float32, bfloat16 or float16.")
    device: str = option(default="auto", help="auto, cpu, cuda or cuda:N.")
    trust_remote_code: bool = trust_remote_code()
    allow_pickle: bool = option(
        flag=True,
        default=False,
        help="Load .bin/.pt weights (torch.load, weights_only) when a model has no safetensors.",
    )


@dataclass(frozen=True, kw_only=True)
class TemplateOptions(Declared):
    """How prompts are rendered: every command that reads prompts."""

    template: str = option(
        default="auto",
        help="Prompt template of prompt-response rows: plain, alpaca, chat, or auto (prompt/completion: plain; "
        "messages: chat; instruction styles: alpaca).",
    )
    system_prompt: str | None = option(
        metavar="TEXT",
        help="Chat template: the system turn of rows without one [default: the one every training row opens with, "
        "else the tokenizer's own].",
    )


@dataclass(frozen=True, kw_only=True)
class DataOptions(TemplateOptions):
    """Where rows come from and how they are batched: every command that reads data."""

    data: str | None = option(
        "--data",
        "-d",
        required=True,
        help="Local .jsonl/.json/.csv/.parquet file, hub data set (e.g. meta-math/MetaMathQA), or a built-in set:"
        " arithmetic, gsm-symbolic, reuters-r8 (lorasb data list).",
    )
    split: str | None = option(default="train", help="Split of a hub or built-in data set.")
    data_config: str | None = option(help="Configuration of a hub data set (e.g. main, sst2).")
    fields: str | None = option(help="Columns named otherwise: prompt=COL,response=COL,label=COL.")
    size: int | None = option(type=int, range=AT_LEAST_1, help="Rows of a built-in data set (lorasb data list).")
    batch_size: int = option(default=8, range=AT_LEAST_1, help="Samples per forward pass.")
    max_length: int | None = option(
        type=int,
        range=Range(2),  # a prompt token and a supervised one, or [CLS] and [SEP]
        help="Tokens per sample, at most.",
        show_default=f"{MAX_LENGTH}, or the model's position limit if smaller",
    )


@dataclass(frozen=True, kw_only=True)
class TrainingDataOptions(DataOptions):
    """Data a model learns from (estimate, train, compare): its format is chosen, not fixed by a task."""

    format: str = option(
        "--format",
        default="auto",
        help="text, prompt-response, classification, regression, or auto (picked from the fields).",
    )


def allow_unverified():
    """--allow-unverified, for the commands that read artifacts (artifacts.unverified_allowed)."""
    return option(
        flag=True, default=False, help="Read artifacts that record no hashes of their tensors (older lorasb files)."
    )


def force_base():
    """--force-base, for the commands that apply an artifact to a model (models.check_base)."""
    return option(flag=True, default=False, help="Apply the factors or adapter to another base than it was made on.")


def force_template():
    """--force-template, for the commands that read a template recorded by an earlier stage."""
    return option(flag=True, default=False, help="Use --template even where the factors or adapter used another.")
