"""`lorasb COMMAND --help` and click's usage errors import none of the heavy libraries, read from `python -X
importtime` of a real subprocess; and the plug-in declarations they read name implementations that exist."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import lorasb_cli
from lorasb_cli import cli, inits, methods

HEAVY = {"torch", "transformers", "peft", "datasets", "accelerate", "matplotlib", "safetensors.torch"}
ROOT = Path(lorasb_cli.__file__).parent.parent  # `-m lorasb_cli` from here runs the package these tests import


def imported_modules(importtime: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its stderr (`import time: self | cumulative | name`)."""
    rows = [line.split("|")[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")]
    return set(rows[1:])  # the first row is the column header


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lorasb_cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done, imported_modules(done.stderr)


def heavy_of(modules: set[str]) -> set[str]:
    return {m for m in modules if m in HEAVY or m.split(".")[0] in HEAVY}


@pytest.mark.parametrize("command", sorted(cli.cli.commands))
def test_command_help_imports_no_heavy_library(command):
    done, modules = run_cli(command, "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Usage: lorasb {command}" in done.stdout
    assert {"click", "lorasb_cli.cli"} <= modules  # the reader sees the imports that did happen
    assert heavy_of(modules) == set()


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_group_help_and_version_import_no_heavy_library(args):
    done, modules = run_cli(*args)
    assert done.returncode == 0 and "lorasb" in done.stdout
    assert heavy_of(modules) == set()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--no-such-flag"], "No such option '--no-such-flag'"),
        (["train", "-d", "rows.jsonl", "-o", "run"], "Missing option '--model'"),
        (["train", "-m", "m", "-d", "rows.jsonl", "-o", "run", "--lr", "fast"], "Invalid value for '--lr'"),
        (["decompose", "u.safetensors", "--rank", "4", "--noise-std", "big"], "Invalid value for '--noise-std'"),
        (["estimate", "-m", "m", "--accumulate-on", "gpu"], "Invalid value for '--accumulate-on'"),
    ],
)
def test_usage_error_imports_no_heavy_library(args, message):
    done, modules = run_cli(*args)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert done.returncode == 2 and len(errors) == 1 and message in errors[0]
    assert heavy_of(modules) == set()


def test_help_still_lists_every_plugin_option():
    train, _ = run_cli("train", "--help")
    decompose, _ = run_cli("decompose", "--help")
    for flag in ("--init-scale", "--rank", "--alpha", "--init-samples", "--init-iters"):
        assert flag in train.stdout
    assert "--noise-std" in decompose.stdout


def test_the_reader_sees_a_heavy_import():
    """The checks above pass only if `imported_modules` would catch torch: here it must."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import safetensors.torch"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert {"torch", "safetensors.torch"} <= heavy_of(imported_modules(done.stderr))


@pytest.mark.parametrize(
    "package, entries, function",
    [(methods, methods.METHODS, "prepare"), (inits, inits.INITS, "factor")],
)
def test_every_declared_plugin_has_its_implementation(package, entries, function):
    """Each declaration names a function (and a method its layer variant) that exists (importing its module), and
    each module is named by one."""
    assert all(callable(getattr(entry, function)) for entry in entries.values())
    named = {entry.implementation.partition(":")[0] for entry in entries.values()}
    variants = [entry for entry in entries.values() if getattr(entry, "variant", None)]
    assert all(entry.layer_variant.module_tensors for entry in variants)  # imported, and reads its own tensors
    named |= {entry.variant.partition(":")[0] for entry in variants}
    assert named == {info.name for info in pkgutil.iter_modules(package.__path__)}


def test_help_lists_the_registered_plugins_with_their_summaries():
    """`lorasb --help` lists every init and method from its registration, with its summary; --init and --method
    name every registered one (a new plug-in needs no help text edited by hand)."""
    from click.testing import CliRunner

    group = " ".join(CliRunner().invoke(cli.cli, ["--help"], terminal_width=400).output.split())
    for registry in (inits.INITS, methods.METHODS):
        for name, summary in registry.summaries():
            assert f"{name} {' '.join(summary.split())}" in group
    for command, registry in (("decompose", inits.INITS), ("train", methods.METHODS)):
        text = " ".join(CliRunner().invoke(cli.cli, [command, "--help"], terminal_width=400).output.split())
        assert f"{', '.join(registry)} (each described in lorasb --help)" in text
