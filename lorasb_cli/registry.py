"""A name → entry table for the pluggable parts (inits, methods, tasks): each registers its entries, and an
unknown name is a one-line error with a "did you mean" hint."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from .errors import BadInputError

T = TypeVar("T")


def did_you_mean(name: str, known) -> str:
    """The hint of an unknown-name error: the closest known name, then all of them."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    prefix = f"did you mean '{close[0]}'? " if close else ""
    return f"{prefix}known: {', '.join(known)}"


def import_plugins(package: str, path: Iterable[str]) -> None:
    """Import every module of a plug-in package (each registers its entries): a new plug-in is one new file."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")


def import_implementation(package: str, reference: str) -> Callable:
    """The function a plug-in declaration names as "module:function" in `package`, importing that module (and what
    it imports: torch, PEFT) only now."""
    module, _, function = reference.partition(":")
    return getattr(importlib.import_module(f"{package}.{module}"), function)


class Registry(dict[str, T], Generic[T]):
    def __init__(self, what: str):
        super().__init__()
        self.what = what  # how errors name a key, e.g. "--init"

    def register(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.what} '{name}' registered twice")
        self[name] = entry
        return entry

    def summaries(self) -> list[tuple[str, str]]:
        """(name, summary) of every entry, as registered: what help texts list."""
        return [(name, entry.summary) for name, entry in self.items()]

    def lookup(self, name: str) -> T:
        if name not in self:
            raise BadInputError(f"unknown {self.what} '{name}'", hint=did_you_mean(name, sorted(self)))
        return self[name]
