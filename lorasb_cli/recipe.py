"""Recipes: one YAML file of options for every command (`--config FILE.yaml`, `lorasb run RECIPE.yaml`).

A recipe's top-level keys are options of any command: each command takes those it has, except the options it
keeps to its own section (`Options.section_only`: where the same name means something else there, like
merge's `--format`). A mapping named after a command (`train:` …) adds or overrides options of that command
alone. `out:` and `stages:` are the recipe's own keys (`lorasb run`). Keys are option names, with `_` or `-`.
Values become the options' defaults, so a flag on the command line wins, and click converts and range-checks
them exactly as flags. This module imports no torch: `--help` stays instant.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import click
import yaml

from .errors import BadInputError

RUN_KEYS = ("out", "stages")  # the recipe's own top-level keys (lorasb run); never passed to a command by --config


@dataclass(frozen=True)
class Options:
    """What a recipe may set for one command: its parameters by name, and those only its own section sets."""

    params: Mapping[str, click.Parameter]
    section_only: frozenset[str] = frozenset()


def load(path: str | Path) -> dict:
    """The recipe at `path` as a mapping whose keys (top level and in sections) are option names with `_`."""
    path = Path(path).expanduser()
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as e:
        raise BadInputError(f"cannot read the recipe ({e.strerror})", path=str(path), hint="pass a YAML file") from e
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise BadInputError(f"the recipe is not valid YAML{line}", path=str(path), hint="fix its syntax") from e
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise BadInputError("a recipe is a mapping of option names to values", path=str(path))
    return {_key(k): (_section(v) if isinstance(v, dict) else v) for k, v in document.items()}


def options_for(document: Mapping, path: str | Path, command: str, commands: Mapping[str, Options]) -> dict:
    """The values the recipe gives `command` (top level, then its section over it), converted as its flags would
    be given; every key of the recipe is checked against `commands` ({name: Options}) first."""
    check(document, path, commands)
    own = commands[command]
    values = {
        k: v
        for k, v in document.items()
        if k in own.params and k not in own.section_only and k not in RUN_KEYS and not _is_section(k, v, commands)
    }
    values |= document.get(command) or {}
    return {k: _as_flag(own.params[k], v, path) for k, v in values.items() if v is not None}


def check(document: Mapping, path: str | Path, commands: Mapping[str, Options]) -> None:
    """Refuse a top-level key no command has, a section of no command, and a section key its command lacks; each
    one line naming the closest name."""
    everything = sorted({name for options in commands.values() for name in options.params} | set(RUN_KEYS))
    for key, value in document.items():
        if _is_section(key, value, commands):
            for name in value:
                if name not in commands[key].params:
                    _unknown(f"'{name}' in section '{key}:'", name, sorted(commands[key].params), path, key)
        elif key not in everything:
            if isinstance(value, dict):
                _unknown(f"section '{key}:' (no such command)", key, sorted(commands), path)
            _unknown(f"key '{key}'", key, everything, path)


def _is_section(key: str, value: object, commands: Mapping[str, Options]) -> bool:
    # `data:` is both an option (--data NAME) and a command (lorasb data): a mapping is the section.
    return key in commands and (isinstance(value, dict) or value is None)


def _unknown(what: str, key: str, known: list[str], path: str | Path, command: str | None = None):
    closest = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    see = f"lorasb {command} --help" if command else "lorasb COMMAND --help"
    hint = f"did you mean '{closest[0]}'? (see '{see}')" if closest else f"see '{see}' for the option names"
    raise BadInputError(f"unknown {what} in the recipe", path=str(path), hint=hint)


def _key(key: object) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


def _section(section: dict) -> dict:
    return {_key(k): v for k, v in section.items()}


def _as_flag(param: click.Parameter, value: object, path: str | Path) -> object:
    """A YAML value as its flag would give it: a list as the comma list the option takes (`[q_proj, v_proj]` →
    `q_proj,v_proj`), a mapping as `KEY=VALUE,...` (--fields, compare's --lr); click converts the rest."""
    many = param.nargs != 1 or getattr(param, "multiple", False)
    if isinstance(value, bool) and not getattr(param, "is_flag", False) and not many:
        raise BadInputError(
            f"'{param.name}: {str(value).lower()}' in the recipe: {param.name} takes a value, not true/false",
            path=str(path),
            hint="quote it if you mean the word",
        )
    if isinstance(value, (list, tuple)) and not many:
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if many and not isinstance(value, (list, tuple)):
        return [value]
    return value
